//! `logbridge health`: asks a running instance's `/healthz` (or `/readyz`) and exits 0 when it
//! answers 200, 1 otherwise. For container healthchecks, where the image has no curl.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
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

/// Asks the endpoint; `Ok(line)` with the answer's first line of body when it says 200,
/// `Err(why)` otherwise.
pub fn health(options: &HealthOptions) -> Result<String, String> {
    let address = resolve(&options.address)?;
    let timeout = Duration::from_secs(options.timeout);
    let path = if options.ready { "/readyz" } else { "/healthz" };
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .map_err(|err| format!("cannot connect to {address}: {err}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|err| format!("cannot set timeouts: {err}"))?;
    // One write: `write!` on the stream would send the request in pieces.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|err| format!("cannot ask {address}{path}: {err}"))?;
    let mut answer = Vec::new();
    // An answer is a few hundred bytes; more is not read.
    stream
        .take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(|err| format!("no answer from {address}{path}: {err}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("none");
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    if status == "200" {
        Ok(format!("{path}: {body}"))
    } else {
        Err(format!("{path} answered {status}: {body}"))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
