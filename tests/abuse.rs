//! The HTTP endpoint under abuse, against a `logbridge run` process: 1 000 concurrent
//! connections (slow clients that never finish their headers, and garbage request lines) while
//! a well-behaved client keeps scraping. The endpoint keeps answering it, and the pipeline's
//! throughput during the abuse is printed beside a quiet run of the same size (measured, not
//! asserted: these machines are shared). Also: `/readyz` fails until the group assigns.

mod common;

use std::time::{Duration, Instant};

use common::process::Instance;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BATCH: u64 = 150_000;

async fn finished(instance: &Instance) -> f64 {
    // `None`: the endpoint did not answer this time (under the abuse below it may not): no
    // progress seen. A metric renamed fails in `metric`.
    instance
        .child
        .metric("logbridge_events_finished_total")
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_keeps_answering_under_a_thousand_abusive_connections() {
    let _serial = serial().await;
    let kafka = Kafka::start("logs", 4);
    let work = tempfile::tempdir().expect("workdir");
    let group = unique("abuse");
    let instance = Instance::start(&kafka.brokers, &kafka.topic, &group, work.path(), "lb", "");
    let address = instance.child.address().await;

    // Before the group assigns anything, the instance is alive but not ready.
    let listening = wait_for(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(address).await.is_ok()
    })
    .await;
    assert!(listening);
    let (early_status, early_body) = http_get(address, "/readyz").await;
    assert_eq!(early_status, 503, "{early_body}");
    assert!(
        early_body.contains("not in a consumer group"),
        "{early_body}"
    );

    let ready = wait_for(Duration::from_secs(60), || async move {
        http_get(address, "/readyz").await.0 == 200
    })
    .await;
    assert!(ready, "ready once assigned");

    // Quiet run: one batch, timed from the start of producing it until it is finished (the
    // pipeline keeps up with the producer, so timing from the end of production measures
    // nothing).
    let started = Instant::now();
    kafka.produce_samples(BATCH, 0.0, 1).await;
    let quiet = wait_for(Duration::from_secs(120), || {
        let instance = &instance;
        async move { finished(instance).await >= BATCH as f64 }
    })
    .await;
    assert!(quiet, "the quiet batch did not finish");
    let quiet_rate = BATCH as f64 / started.elapsed().as_secs_f64();
    assert_eq!(
        http_get(address, "/readyz").await.0,
        200,
        "ready once assigned"
    );

    // Abuse: 1 000 connections, most of them slow clients that never finish their headers
    // (they trickle a header value, which stays valid, so only the header timeout ends them),
    // some sending garbage request lines (answered 400 and closed).
    // Each abuser counts itself once it is connected and its first bytes are written, and
    // uncounts itself when the server closes its connection: all 1 000 must be open, or the
    // test proves nothing about 1 000 connections.
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut abusers = Vec::new();
    for n in 0..1_000 {
        let open = open.clone();
        abusers.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(address)
                .await
                .expect("an abusive connection is accepted");
            let first: &[u8] = if n % 10 == 0 {
                b"\x16\x03\x01 garbage \r\n\r\n"
            } else {
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: "
            };
            stream
                .write_all(first)
                .await
                .expect("an abusive request is sent");
            open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Hold the connection, trickling a byte of the header value every 500 ms, for up
            // to 8 s (longer than the server's header timeout), until the server closes it.
            let mut buffer = [0u8; 512];
            for _ in 0..16 {
                tokio::select! {
                    read = stream.read(&mut buffer) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if stream.write_all(b"a").await.is_err() {
                            break;
                        }
                    }
                }
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    // The slow ones (900) must all be open at once; the garbage ones may already be answered.
    let all_open = wait_for(Duration::from_secs(20), || {
        let open = open.clone();
        async move { open.load(std::sync::atomic::Ordering::SeqCst) >= 900 }
    })
    .await;
    assert!(
        all_open,
        "only {} of 1000 abusive connections open at once",
        open.load(std::sync::atomic::Ordering::SeqCst)
    );
    // The batch is produced while the good client asks: the slow clients hold their
    // connections only for the server's 5 s header timeout.
    let started = Instant::now();
    let asking = async {
        let mut answered = 0;
        let mut asked = 0;
        let mut slowest = Duration::ZERO;
        // Answer times of the requests made while at least 900 abusers held their connections.
        let mut abused_answer_times = Vec::new();
        // The good client asks at least 12 times, on while the abusers hold their
        // connections, and on until the batch is finished.
        let mut abused_rate = None;
        while started.elapsed() < Duration::from_secs(120) {
            let done = finished(&instance).await >= 2.0 * BATCH as f64;
            if done && abused_rate.is_none() {
                abused_rate = Some(BATCH as f64 / started.elapsed().as_secs_f64());
            }
            if done && asked >= 12 && open.load(std::sync::atomic::Ordering::SeqCst) < 900 {
                break;
            }
            asked += 1;
            let abused = open.load(std::sync::atomic::Ordering::SeqCst) >= 900;
            let asked_at = Instant::now();
            if let Ok((200, body)) =
                tokio::time::timeout(Duration::from_secs(2), http_get(address, "/metrics")).await
            {
                if body.contains("logbridge_events_consumed_total") {
                    answered += 1;
                }
            }
            slowest = slowest.max(asked_at.elapsed());
            if abused && open.load(std::sync::atomic::Ordering::SeqCst) >= 900 {
                abused_answer_times.push(asked_at.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (answered, asked, slowest, abused_answer_times, abused_rate)
    };
    let (_, (answered, asked, slowest, mut abused_answer_times, abused_rate)) =
        tokio::join!(kafka.produce_samples(BATCH, 0.0, 2), asking);
    let abused_rate = abused_rate.unwrap_or_else(|| BATCH as f64 / started.elapsed().as_secs_f64());
    for abuser in abusers {
        abuser.abort();
        // Cancelled, or ended on its own: either is fine; a panic (its connection refused, its
        // request not sent) fails the test instead of going unseen.
        if let Err(err) = abuser.await {
            if err.is_panic() {
                std::panic::resume_unwind(err.into_panic());
            }
        }
    }
    // The slow clients hold their connections until the 5 s header timeout: at one request
    // per 100 ms or so, about 40 are asked under abuse; at least 5 must be.
    assert!(
        abused_answer_times.len() >= 5,
        "only {} requests were made while 900 abusers held their connections",
        abused_answer_times.len()
    );
    abused_answer_times.sort();
    let median = abused_answer_times[abused_answer_times.len() / 2];
    println!(
        "abuse: 1000 abusive connections; the good client got {answered}/{asked} scrapes ({} while 900 abusers held their connections), median {median:?} of those, slowest {slowest:?}; \
         pipeline {quiet_rate:.0} events/s quiet, {abused_rate:.0} events/s under abuse",
        abused_answer_times.len()
    );
    // "Answers in milliseconds": the median answer, with a hundredfold margin for a shared
    // machine (seen: about 1 ms).
    assert!(
        median < Duration::from_millis(100),
        "the good client's median answer took {median:?}"
    );
    assert!(
        asked > 0 && answered * 10 >= asked * 9,
        "the endpoint stopped answering: {answered}/{asked}"
    );
    assert!(
        finished(&instance).await >= 2.0 * BATCH as f64,
        "the pipeline did not finish under abuse"
    );
}

/// The connection cap and the header timeout, on a pipeline with `http.max_connections = 8`:
/// eight clients that never finish their headers take every slot, a ninth request waits (it
/// is not answered while they hold the slots), their connections are closed after the 5 s
/// header timeout, and the ninth is answered then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds_requests_until_the_header_timeout_frees_a_slot() {
    let _serial = serial().await;
    use tokio::io::AsyncReadExt;
    let kafka = Kafka::start("logs", 1);
    let group = unique("cap");
    let dir = tempfile::tempdir().expect("dir");
    let mut config = kafka.config(&group, "", &file_route("all", "[\"info\"]", 1, dir.path()));
    config.http.max_connections = 8;
    let (running, address) = Running::start_serving(config, Default::default()).await;
    // Serving: a whole request answered. HTTP/1.0, so the server closes the connection once it
    // has answered, and its slot is free again when the answer has been read (no probe holds a
    // slot the slow clients below must take).
    let serving = wait_for(Duration::from_secs(10), || async move {
        http_get(address, "/healthz").await.0 == 200
    })
    .await;
    assert!(serving, "the endpoint never answered");

    let opened = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("partial headers");
        slow.push(stream);
    }
    // The ninth: a whole request, which cannot be served while the eight hold their slots.
    let ninth = tokio::spawn(async move {
        let asked = Instant::now();
        let (status, _) = http_get(address, "/healthz").await;
        (status, asked.elapsed())
    });
    // Time deliberately let pass: the ninth must still be waiting 2 s later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !ninth.is_finished(),
        "the ninth request was served beyond the cap"
    );
    // The slow ones are closed by the header timeout (5 s): their reads end.
    for stream in &mut slow {
        let mut buffer = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut buffer)).await;
        assert!(closed.is_ok(), "a slow client was not disconnected");
    }
    let closed_after = opened.elapsed();
    let (status, waited) = tokio::time::timeout(Duration::from_secs(15), ninth)
        .await
        .expect("the ninth request is answered once a slot is free")
        .expect("joined");
    println!(
        "cap 8: slow clients closed after {closed_after:?}; the ninth request waited {waited:?}"
    );
    assert_eq!(status, 200);
    assert!(
        closed_after >= Duration::from_secs(4),
        "the header timeout is 5 s, yet the slow clients were closed after {closed_after:?}"
    );
    running.stop().await;
}
