//! `baton status NAME --watch` in a pseudo-terminal (util-linux `script` gives it one):
//! frames are redrawn in place, and the last one — steps with the current one marked,
//! a weight bar per revision, the gates' last results — matches the snapshot once the
//! parts that change from run to run (ports, pids, revision hashes, times, counts) are
//! normalised. Piped, the same command prints plain frames with no escape codes.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Env, canary_spec, free_addr, wait_status};

/// Drops ANSI escape sequences (CSI `ESC [ ... final`) and carriage returns.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// Replaces what differs between runs with placeholders.
fn normalise(frame: &str) -> String {
    let mut lines = Vec::new();
    for line in frame.lines() {
        let mut words: Vec<String> = Vec::new();
        for w in line.split(' ') {
            let bare = w.trim_end_matches([',', ')']);
            let tail = &w[bare.len()..];
            let word = if let Some(port) = bare.strip_prefix("127.0.0.1:") {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    format!("127.0.0.1:PORT{tail}")
                } else {
                    w.to_string()
                }
            } else if bare.len() == 10
                && bare.chars().all(|c| c.is_ascii_hexdigit())
                && bare.chars().any(|c| c.is_ascii_digit())
            {
                format!("HASH{tail}")
            } else if bare.len() == 8
                && bare.as_bytes().get(2) == Some(&b':')
                && bare.as_bytes().get(5) == Some(&b':')
            {
                "HH:MM:SS".to_string()
            } else {
                w.to_string()
            };
            words.push(word);
        }
        let mut line = words.join(" ");
        // Gate counters and measured values move while the canary waits.
        if line.trim_start().starts_with("errors") {
            let mut collapsed = String::new();
            for c in line.chars() {
                if !c.is_ascii_digit() {
                    collapsed.push(c);
                } else if !collapsed.ends_with('N') {
                    collapsed.push('N');
                }
            }
            line = collapsed;
        }
        lines.push(line.trim_end().to_string());
    }
    lines.join("\n")
}

fn spawn_reader(mut out: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = out.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock()
                .expect("buffer")
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

fn wait_output(
    buf: &Arc<Mutex<String>>,
    limit: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = buf.lock().expect("buffer").clone();
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; output so far:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_redraws_in_place_in_a_terminal_and_prints_plain_frames_in_a_pipe() {
    let mut env = Env::new();
    let listen = free_addr();
    let steps =
        "        - setWeight: 20\n        - analysis: { gates: [errors] }\n        - pause: {}";
    let spec = |v: &str| {
        canary_spec(listen, v, "", steps).replace("      - name: p99\n        metric: { builtin: latency_p99 }\n        successCondition: \"result < 0.8\"\n        interval: 1s\n        minRequests: 20\n", "")
    };
    let file = env.write("spec.yaml", &spec("v1"));
    let client = env
        .start_healthy(&["-f", file.to_str().expect("path")], "hello")
        .await;
    let load = baton::load::Load::start(listen, 2, 100);
    env.write("spec.yaml", &spec("v2"));
    assert!(
        env.run(&["apply", "-f", file.to_str().expect("path")])
            .status
            .success()
    );
    wait_status(
        &client,
        "hello",
        Duration::from_secs(60),
        "the canary paused after its analysis",
        |v| {
            v["phase"] == "Paused"
                && v["step"]["index"] == 2
                && v["gates"][0]["passes"].as_u64().unwrap_or(0) >= 1
        },
    )
    .await;

    // In a terminal.
    let baton = common::baton_bin();
    let cmd = format!(
        "{} --dir {} status hello --watch",
        baton.display(),
        env.paths.root.display()
    );
    let mut script = Command::new("script")
        .args(["-q", "-f", "-c", &cmd, "/dev/null"])
        .env("TERM", "xterm-256color")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("script (util-linux) runs");
    let buf = spawn_reader(script.stdout.take().expect("stdout"));
    let raw = wait_output(&buf, Duration::from_secs(20), "two frames", |t| {
        t.matches("\x1b[H").count() >= 2 && t.ends_with("\x1b[?25h")
    });
    let _ = script.kill();
    let _ = script.wait();
    let frames: Vec<&str> = raw
        .split("\x1b[?25l\x1b[H")
        .filter(|f| !f.is_empty())
        .collect();
    assert!(
        frames.len() >= 2,
        "each frame starts by homing the cursor: {raw:?}"
    );
    assert!(raw.contains("\x1b[K"), "lines are rewritten in place");
    let last = strip_ansi(frames[frames.len() - 1]);
    insta::assert_snapshot!("status_watch_terminal", normalise(&last));

    // In a pipe: plain frames, no escape codes.
    let mut piped = env
        .cmd()
        .args(["status", "hello", "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("baton status");
    let buf = spawn_reader(piped.stdout.take().expect("stdout"));
    let text = wait_output(&buf, Duration::from_secs(20), "a plain frame", |t| {
        t.contains("Gates:") && t.ends_with('\n')
    });
    let _ = piped.kill();
    let _ = piped.wait();
    assert!(
        !text.contains('\x1b'),
        "no escape codes in a pipe: {text:?}"
    );
    assert!(text.contains("▶  3. pause until promoted"), "{text}");
    load.stop().await;
}
