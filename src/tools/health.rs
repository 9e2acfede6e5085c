//! `logbridge health`: asks a running instance's `/healthz` (or `/readyz`) and exits 0 when it
//! answers 200, 1 otherwise. For container healthchecks, where the image has no curl.
//! `logbridge resume`: `POST /resume` with the configuration's admin token.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::time::Duration;

/// What `logbridge health` asks.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthOptions {
    /// The instance's HTTP endpoint (`http.listen`; a wildcard address is asked on loopback).
    #[arg(long, default_value = "127.0.0.1:9898")]
    pub address: String,
    /// Ask `/readyz` (consuming, nothing stalled) instead of `/healthz` (the process works).
    #[arg(long)]
    pub ready: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub timeout: u64,
}

/// What `logbridge resume` needs: the instance's configuration (its `http.listen` and
/// `http.admin_token`, environment overrides and references applied as `run` applies them).
#[derive(Debug, Clone, clap::Args)]
pub struct ResumeOptions {
    /// Configuration file of the instance to resume.
    #[arg(long, short, env = "LOGBRIDGE_CONFIG", default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Ask this `host:port` instead of the configuration's `http.listen`.
    #[arg(long)]
    pub address: Option<String>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub timeout: u64,
}

/// Asks the endpoint; `Ok(line)` with the answer's first line of body when it says 200,
/// `Err(why)` otherwise.
pub fn health(options: &HealthOptions) -> Result<String, String> {
    let path = if options.ready { "/readyz" } else { "/healthz" };
    let (status, body) = ask(
        reqwest::Method::GET,
        &options.address,
        path,
        None,
        Duration::from_secs(options.timeout),
    )?;
    if status == 200 {
        Ok(format!("{path}: {body}"))
    } else {
        Err(format!("{path} answered {status}: {body}"))
    }
}

/// Resets a tripped breaker of the instance `options.config` describes: `Ok(line)` when it
/// answers 200 (nothing to resume) or 202 (resumed), `Err(why)` otherwise.
pub fn resume(options: &ResumeOptions) -> Result<String, String> {
    let config = crate::Config::load(&options.config)
        .map_err(|err| format!("{}: {err}", options.config.display()))?;
    let address = options
        .address
        .clone()
        .unwrap_or_else(|| config.http.listen.clone());
    let token = config
        .http
        .admin_token
        .as_deref()
        .filter(|token| !token.is_empty());
    let (status, body) = ask(
        reqwest::Method::POST,
        &address,
        "/resume",
        token,
        Duration::from_secs(options.timeout),
    )?;
    match status {
        200 | 202 => Ok(format!("POST /resume: {body}")),
        _ => Err(format!("POST /resume answered {status}: {body}")),
    }
}

/// The status and the first line of the body of `method` on `path` at `address`.
fn ask(
    method: reqwest::Method,
    address: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let url = endpoint_url(resolve(address)?, path);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start: {err}"))?;
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| format!("cannot make an HTTP client: {err}"))?;
        let mut request = client.request(method, url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|err| {
            format!(
                "cannot connect to {address}: {}",
                crate::http_sink::with_causes(&err)
            )
        })?;
        let status = response.status().as_u16();
        // An answer is a few hundred bytes; a line is all that is shown.
        let body = response.text().await.unwrap_or_default();
        let line = body
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(1000)
            .collect();
        Ok((status, line))
    })
}

/// `host:port` to an address; a wildcard (`0.0.0.0`, `[::]`, as `http.listen` often is in
/// containers) means this host's loopback.
fn resolve(address: &str) -> Result<SocketAddr, String> {
    let mut resolved = address
        .to_socket_addrs()
        .map_err(|err| format!("`{address}` is not host:port: {err}"))?;
    let mut address = resolved
        .next()
        .ok_or_else(|| format!("`{address}` resolves to nothing"))?;
    if address.ip().is_unspecified() {
        address.set_ip(if address.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(address)
}

/// `http://<address><path>`, built by the URL type (an IPv6 address gets its brackets).
fn endpoint_url(address: SocketAddr, path: &str) -> reqwest::Url {
    // A constant that parses; its host and port are replaced, which an http URL always allows
    // (the two results are Err only for URLs that cannot have a host).
    let mut url = reqwest::Url::parse("http://localhost/").expect("a valid constant URL");
    let _ = url.set_ip_host(address.ip());
    let _ = url.set_port(Some(address.port()));
    url.set_path(path);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_are_built_for_ipv4_and_ipv6() {
        let v4: SocketAddr = "127.0.0.1:9898".parse().expect("address");
        assert_eq!(
            endpoint_url(v4, "/healthz").as_str(),
            "http://127.0.0.1:9898/healthz"
        );
        let v6: SocketAddr = "[::1]:80".parse().expect("address");
        assert_eq!(endpoint_url(v6, "/readyz").as_str(), "http://[::1]/readyz");
    }
    use std::io::{Read as _, Write as _};

    #[test]
    fn a_wildcard_listen_address_is_asked_on_loopback() {
        assert_eq!(
            resolve("0.0.0.0:9898").unwrap(),
            "127.0.0.1:9898".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            resolve("[::]:1").unwrap(),
            "[::1]:1".parse::<SocketAddr>().unwrap()
        );
        assert!(resolve("nonsense").is_err());
    }

    #[test]
    fn answers_are_read_from_a_real_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let serve = |status: &'static str, body: &'static str| {
            let (mut stream, _) = listener.accept().unwrap();
            // The whole request head, however the client's writes arrive.
            let mut request = Vec::new();
            let mut chunk = [0u8; 512];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = stream.read(&mut chunk).unwrap();
                assert!(read > 0, "the client closed before its request ended");
                request.extend_from_slice(&chunk[..read]);
            }
            let request = String::from_utf8_lossy(&request).into_owned();
            write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            request
        };
        let options = |ready| HealthOptions {
            address: address.clone(),
            ready,
            timeout: 3,
        };
        let asked = std::thread::scope(|scope| {
            let server = scope.spawn(|| serve("200 OK", "ok\n"));
            assert_eq!(health(&options(false)), Ok("/healthz: ok".to_string()));
            server.join().unwrap()
        });
        assert!(asked.starts_with("GET /healthz "), "{asked}");
        std::thread::scope(|scope| {
            let server = scope.spawn(|| serve("503 Service Unavailable", "not ready: stalled\n"));
            assert_eq!(
                health(&options(true)),
                Err("/readyz answered 503: not ready: stalled".to_string())
            );
            assert!(server.join().unwrap().starts_with("GET /readyz "));
        });
        drop(listener);
        assert!(health(&options(false))
            .unwrap_err()
            .contains("cannot connect"));
    }
}
