//! `moderato` run as a separate process (the binary Cargo built for these tests), with its JSON
//! log lines collected as they come, for tests that signal or kill it.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `moderato`; killed on drop if still running.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    /// Every stderr line so far.
    pub lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_moderato")
}

impl Proc {
    /// Runs `moderato <args>` inside the network namespace `ns` (`ip netns exec`, which execs it:
    /// the child's PID is moderato's, for signals).
    pub fn spawn_in(ns: &str, args: &[&str]) -> Proc {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, bin()]).args(args);
        Proc::run(c)
    }

    /// Runs `moderato <args>`; with `nofile`, under `ulimit -n <nofile>` (through `sh`).
    pub fn spawn(args: &[&str], nofile: Option<u32>) -> Proc {
        let cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" \"$@\"")).arg(bin()).args(args);
                c
            }
            None => {
                let mut c = Command::new(bin());
                c.args(args);
                c
            }
        };
        Proc::run(cmd)
    }

    fn run(mut cmd: Command) -> Proc {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push(line);
            }
        });
        Proc { child, lines, reader: Some(reader) }
    }

    /// `moderato deploy --role host --policy <policy> --config <config> --log-format json` plus
    /// `extra`.
    pub fn deploy(policy: &str, config: &Path, extra: &[&str], nofile: Option<u32>) -> Proc {
        let mut args =
            vec!["deploy", "--role", "host", "--policy", policy, "--config", config.to_str().unwrap()];
        args.extend(["--log-format", "json"]);
        args.extend(extra);
        Proc::spawn(&args, nofile)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The JSON events so far (lines that are not JSON are skipped: the binary's last `error:`).
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Waits until `pred` holds for some event, or panics after `within` with the log.
    pub fn wait_for(&mut self, within: Duration, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if self.events().iter().any(&pred) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                panic!("moderato exited ({st}) before {what}:\n{}", self.text());
            }
            assert!(Instant::now() < deadline, "no {what} within {within:?}:\n{}", self.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (a `kill -s` name: TERM, HUP, KILL, ...).
    pub fn signal(&self, signal: &str) {
        let st = Command::new("kill").args(["-s", signal, &self.pid().to_string()]).status().unwrap();
        assert!(st.success(), "kill -s {signal}");
    }

    /// Waits for the exit (at most `within`), then for the rest of the log.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("moderato did not exit within {within:?}:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        st
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
