//! Fuzzing every input a user hands the binary (issue 14): the shipped scenarios, eval,
//! experiment and deploy configs, and the frozen model's `model.json` and `actor.bpk`, each
//! mutated at random (values replaced by extremes, keys deleted or invented, lines cut, bytes
//! flipped). Every case must end, within [`CASE_BOUND`], in success or in an error that names the
//! file it came from; a panic, a hang or an error that does not say which file is a failure,
//! reported with its case number, seed and the mutated input so that it can be replayed.
//!
//! A case that loads is also run a little: a scenario for two 1 ms intervals under a baseline, an
//! eval config's policies instantiated, a model deciding on a one-VM and a two-VM observation.
//! Half of the `model.json` mutations and every `actor.bpk` mutation are *resealed* (the weights
//! and semantics hashes recomputed), so that the checks behind the integrity hashes are reached.
//!
//! The default suite runs [`CI_CASES`] cases; the long run is
//! `MODERATO_FUZZ_CASES=100000 cargo test --release -p moderato-agent --test fuzz_inputs -- --ignored --nocapture`
//! (its result is in the README). `MODERATO_FUZZ_SEED` picks another seed.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moderato_agent::deploy::DeployConfig;
use moderato_agent::eval::EvalConfig;
use moderato_agent::resolve::{PolicySource, controller_factory};
use moderato_agent::train::ExperimentConfig;
use moderato_env::live::Role;
use moderato_env::random::splitmix64;
use moderato_env::sim::{Scenario, SimConfig, SimEnv};
use moderato_env::{Env, Observation};
use moderato_policies::Policy;
use moderato_policies::learned::{LearnedPolicy, ModelMeta, semantics_sha256};
use sha2::{Digest, Sha256};

/// Cases of the default suite.
const CI_CASES: usize = 2000;
/// Longest a case may take before it counts as a hang (cases take milliseconds; the bound leaves
/// room for a loaded 2-core CI machine).
const CASE_BOUND: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

// ---------------------------------------------------------------------------------------------
// A small deterministic generator: case `i` of seed `s` is always the same input.

struct Rng(u64);

impl Rng {
    fn new(seed: u64, case: u64) -> Rng {
        Rng(splitmix64(seed ^ splitmix64(case)))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }
}

// ---------------------------------------------------------------------------------------------
// Values a mutation puts in.

const INTS: &[i64] = &[
    0,
    1,
    -1,
    2,
    3,
    7,
    64,
    255,
    256,
    1023,
    1024,
    65_535,
    65_536,
    1 << 20,
    1 << 31,
    1_000_000_000,
    4_000_000_000,
    i64::MAX,
    i64::MIN,
];
const FLOATS: &[f64] = &[
    0.0,
    -0.0,
    1e-300,
    -1e-300,
    5e-324,
    1e-3,
    0.5,
    1.5,
    1e9,
    4e9,
    1e300,
    1e308,
    -1e308,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
];
const STRINGS: &[&str] = &[
    "",
    "x",
    "../../../../tmp/x",
    "/dev/zero",
    "/etc/passwd",
    ".",
    "..",
    "a/b",
    "é",
    "static:99999999/99999999",
    "static:0/0",
    "static:moderate",
    "dim",
    "itr",
    "best-static",
    "per-packet",
    "poisson",
    "on-off",
    "closed-loop",
    "trace",
    "diurnal",
    "ramp",
    "constant",
    "stream",
    "bulk-tx",
    "request-response",
    "relu",
    "tanh",
    "both",
    "none",
    "host",
    "guest",
    "udp-echo",
    "eth0",
    "trace.csv",
    "nope.toml",
    "../../models/default",
    "scenarios/bulk-stream.toml",
];
/// Whole arrival processes known to have broken the simulator, and a valid trace.
const ARRIVALS: &[&str] = &[
    r#"{ process = "on-off", on_rate_pps = 0, off_rate_pps = 0, mean_on_ms = 1, mean_off_ms = 1 }"#,
    r#"{ process = "on-off", on_rate_pps = 1000, mean_on_ms = 1e-300, mean_off_ms = 1e-300 }"#,
    r#"{ process = "trace", path = "/dev/zero" }"#,
    r#"{ process = "trace", path = "trace.csv" }"#,
    r#"{ process = "trace", path = "." }"#,
    r#"{ process = "closed-loop", clients = 100000, think_us = 0, timeout_us = 1 }"#,
    r#"{ process = "diurnal", mean_pps = 1e8, amplitude = 1, period_s = 1e-6 }"#,
    r#"{ process = "ramp", from_pps = 0, to_pps = 2e8, over_s = 0 }"#,
];
/// Number literals swapped into the text (some are not TOML integers at all).
const LITERALS: &[&str] = &[
    "18446744073709551615",
    "99999999999999999999",
    "1e9",
    "4e9",
    "-1",
    "0",
    "nan",
    "inf",
    "-inf",
    "1e-300",
    "1e308",
    "0x7fffffff",
];

fn long_string(rng: &mut Rng) -> String {
    "x".repeat(1 + rng.below(100_000))
}

fn toml_value(rng: &mut Rng) -> toml::Value {
    use toml::Value as V;
    match rng.below(9) {
        0 | 1 => V::Integer(*rng.pick(INTS)),
        2 | 3 => V::Float(*rng.pick(FLOATS)),
        4 | 5 => V::String(rng.pick(STRINGS).to_string()),
        6 => V::Boolean(rng.chance(2)),
        7 => match rng.below(4) {
            0 => V::Array(vec![]),
            1 => V::Table(toml::Table::new()),
            2 => V::String(long_string(rng)),
            _ => V::Array(vec![V::Integer(*rng.pick(INTS)); 1 + rng.below(3)]),
        },
        _ => format!("x = {}", rng.pick(ARRIVALS))
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("x"))
            .unwrap_or(V::Integer(0)),
    }
}

fn json_value(rng: &mut Rng) -> serde_json::Value {
    use serde_json::{Value as V, json};
    match rng.below(8) {
        0 | 1 => json!(*rng.pick(INTS)),
        2 | 3 => serde_json::Number::from_f64(*rng.pick(FLOATS)).map_or(V::Null, V::Number),
        4 => json!(u64::MAX),
        5 => json!(*rng.pick(STRINGS)),
        6 => match rng.below(4) {
            0 => json!([]),
            1 => json!({}),
            2 => V::Null,
            _ => json!(rng.chance(2)),
        },
        _ => json!(-(rng.below(20) as f64) / 2.0),
    }
}

// ---------------------------------------------------------------------------------------------
// Mutating trees: a path is a list of steps (a key or an index).

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

trait Tree: Sized + Clone {
    /// Children of this node, with the step to each.
    fn children(&self) -> Vec<(Step, &Self)>;
    fn child_mut(&mut self, step: &Step) -> Option<&mut Self>;
    /// Removes a child; false if this node has none such.
    fn remove(&mut self, step: &Step) -> bool;
    /// Adds an unknown key (tables) or repeats an element (arrays); false for a leaf.
    fn grow(&mut self, rng: &mut Rng, v: Self) -> bool;
}

impl Tree for toml::Value {
    fn children(&self) -> Vec<(Step, &Self)> {
        match self {
            toml::Value::Table(t) => t.iter().map(|(k, v)| (Step::Key(k.clone()), v)).collect(),
            toml::Value::Array(a) => a.iter().enumerate().map(|(i, v)| (Step::Index(i), v)).collect(),
            _ => vec![],
        }
    }
    fn child_mut(&mut self, step: &Step) -> Option<&mut Self> {
        match (self, step) {
            (toml::Value::Table(t), Step::Key(k)) => t.get_mut(k),
            (toml::Value::Array(a), Step::Index(i)) => a.get_mut(*i),
            _ => None,
        }
    }
    fn remove(&mut self, step: &Step) -> bool {
        match (self, step) {
            (toml::Value::Table(t), Step::Key(k)) => t.remove(k).is_some(),
            (toml::Value::Array(a), Step::Index(i)) if *i < a.len() => {
                a.remove(*i);
                true
            }
            _ => false,
        }
    }
    fn grow(&mut self, rng: &mut Rng, v: Self) -> bool {
        match self {
            toml::Value::Table(t) => {
                t.insert(format!("fuzz_{}", rng.below(100)), v);
                true
            }
            toml::Value::Array(a) if !a.is_empty() => {
                let e = a[rng.below(a.len())].clone();
                let n = if rng.chance(8) { 100 } else { 1 };
                a.extend(std::iter::repeat_n(e, n));
                true
            }
            _ => false,
        }
    }
}

impl Tree for serde_json::Value {
    fn children(&self) -> Vec<(Step, &Self)> {
        match self {
            serde_json::Value::Object(m) => m.iter().map(|(k, v)| (Step::Key(k.clone()), v)).collect(),
            serde_json::Value::Array(a) => a.iter().enumerate().map(|(i, v)| (Step::Index(i), v)).collect(),
            _ => vec![],
        }
    }
    fn child_mut(&mut self, step: &Step) -> Option<&mut Self> {
        match (self, step) {
            (serde_json::Value::Object(m), Step::Key(k)) => m.get_mut(k),
            (serde_json::Value::Array(a), Step::Index(i)) => a.get_mut(*i),
            _ => None,
        }
    }
    fn remove(&mut self, step: &Step) -> bool {
        match (self, step) {
            (serde_json::Value::Object(m), Step::Key(k)) => m.remove(k).is_some(),
            (serde_json::Value::Array(a), Step::Index(i)) if *i < a.len() => {
                a.remove(*i);
                true
            }
            _ => false,
        }
    }
    fn grow(&mut self, rng: &mut Rng, v: Self) -> bool {
        match self {
            serde_json::Value::Object(m) => {
                m.insert(format!("fuzz_{}", rng.below(100)), v);
                true
            }
            serde_json::Value::Array(a) if !a.is_empty() => {
                let e = a[rng.below(a.len())].clone();
                let n = if rng.chance(8) { 100 } else { 1 };
                a.extend(std::iter::repeat_n(e, n));
                true
            }
            _ => false,
        }
    }
}

/// Every path in `root`, parents before children.
fn paths<T: Tree>(root: &T) -> Vec<Vec<Step>> {
    let mut out = vec![vec![]];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        let node = walk(root, &p);
        for (s, _) in node.children() {
            let mut q = p.clone();
            q.push(s);
            out.push(q);
        }
        i += 1;
    }
    out
}

fn walk<'a, T: Tree>(root: &'a T, p: &[Step]) -> &'a T {
    let mut n = root;
    for s in p {
        n = n.children().into_iter().find(|(k, _)| same(k, s)).map(|(_, v)| v).unwrap_or(n);
    }
    n
}

fn walk_mut<'a, T: Tree>(root: &'a mut T, p: &[Step]) -> Option<&'a mut T> {
    let mut n = root;
    for s in p {
        n = n.child_mut(s)?;
    }
    Some(n)
}

fn same(a: &Step, b: &Step) -> bool {
    match (a, b) {
        (Step::Key(x), Step::Key(y)) => x == y,
        (Step::Index(x), Step::Index(y)) => x == y,
        _ => false,
    }
}

fn show(p: &[Step]) -> String {
    let mut s = String::new();
    for st in p {
        match st {
            Step::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    if s.is_empty() { "<root>".into() } else { s }
}

/// One structural mutation of `root`; returns what it did.
fn mutate_tree<T: Tree>(rng: &mut Rng, root: &mut T, value: impl Fn(&mut Rng) -> T) -> String {
    let all = paths(root);
    let p = rng.pick(&all).clone();
    match rng.below(6) {
        // Replace the node (most often a leaf: most paths end in leaves).
        0..=2 => {
            let v = value(rng);
            if let Some(n) = walk_mut(root, &p).filter(|_| !p.is_empty()) {
                *n = v;
            }
            format!("replace {}", show(&p))
        }
        3 => {
            if let Some((last, parent)) = p.split_last()
                && let Some(n) = walk_mut(root, parent)
            {
                n.remove(last);
            }
            format!("delete {}", show(&p))
        }
        _ => {
            let v = value(rng);
            if let Some(n) = walk_mut(root, &p) {
                n.grow(rng, v);
            }
            format!("grow {}", show(&p))
        }
    }
}

/// One mutation of the text itself.
fn mutate_text(rng: &mut Rng, text: &str) -> (String, String) {
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len().max(1);
    match rng.below(7) {
        0 => {
            let mut cut = rng.below(text.len() + 1);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            (text[..cut].to_string(), format!("truncate at byte {cut}"))
        }
        1 => {
            let i = rng.below(n);
            let v: Vec<&str> = lines.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, l)| *l).collect();
            (v.join("\n"), format!("delete line {}", i + 1))
        }
        2 => {
            let i = rng.below(n);
            let mut v = lines.clone();
            if let Some(l) = lines.get(i) {
                v.insert(i, l);
            }
            (v.join("\n"), format!("duplicate line {}", i + 1))
        }
        3 => (String::new(), "empty file".into()),
        4 => {
            // Swap a number literal for another literal.
            let digits: Vec<usize> = text
                .char_indices()
                .filter(|(i, c)| {
                    c.is_ascii_digit() && !text[..*i].ends_with(|p: char| p.is_ascii_alphanumeric())
                })
                .map(|(i, _)| i)
                .collect();
            if digits.is_empty() {
                return (text.to_string(), "no number".into());
            }
            let at = *rng.pick(&digits);
            let end = text[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
                .map_or(text.len(), |e| at + e);
            let lit = *rng.pick(LITERALS);
            (format!("{}{lit}{}", &text[..at], &text[end..]), format!("number at byte {at} -> {lit}"))
        }
        5 => {
            let mut b = text.as_bytes().to_vec();
            let k = 1 + rng.below(4);
            for _ in 0..k {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] = b[i].wrapping_add(1 + rng.below(255) as u8);
                }
            }
            (String::from_utf8_lossy(&b).into_owned(), format!("flip {k} bytes"))
        }
        _ => {
            let i = rng.below(n);
            let mut v = lines.clone();
            let junk = ["[", "]]", "=", "x = ", "[vm]", "[[vm.flow]]", "\"", "{", "name = 1"];
            v.insert(i, *rng.pick(&junk[..]));
            (v.join("\n"), format!("insert junk at line {}", i + 1))
        }
    }
}

fn mutate_toml(rng: &mut Rng, text: &str) -> (String, String) {
    if rng.chance(4) {
        return mutate_text(rng, text);
    }
    let Ok(table) = text.parse::<toml::Table>() else { return mutate_text(rng, text) };
    let mut root = toml::Value::Table(table);
    let mut what = vec![];
    for _ in 0..1 + usize::from(rng.chance(3)) {
        what.push(mutate_tree(rng, &mut root, toml_value));
    }
    match toml::to_string(&root) {
        Ok(s) => (s, what.join("; ")),
        // NaN and some shapes cannot be written back; fall back to a text mutation.
        Err(_) => mutate_text(rng, text),
    }
}

fn mutate_json(rng: &mut Rng, text: &str) -> (String, String) {
    if rng.chance(5) {
        return mutate_text(rng, text);
    }
    let Ok(mut root) = serde_json::from_str::<serde_json::Value>(text) else { return mutate_text(rng, text) };
    let mut what = vec![];
    // Half the time aim at the semantics: one of the small top-level sections.
    let aim =
        ["network", "normalizer", "action_space", "interval_us", "probes", "format_version", "features"];
    for _ in 0..1 + usize::from(rng.chance(3)) {
        if rng.chance(2) {
            let key = rng.pick(&aim).to_string();
            let sub = if key == "normalizer" && rng.chance(2) { Some("clip") } else { None };
            let node = root.get_mut(&key);
            match (node, sub) {
                (Some(n), Some(s)) if n.is_object() => {
                    n[s] = json_value(rng);
                    what.push(format!("replace .{key}.{s}"));
                }
                (Some(n), None) => what.push(format!(".{key}: {}", mutate_tree(rng, n, json_value))),
                _ => {}
            }
        } else {
            what.push(mutate_tree(rng, &mut root, json_value));
        }
    }
    (serde_json::to_string_pretty(&root).unwrap_or_default(), what.join("; "))
}

// ---------------------------------------------------------------------------------------------
// The inputs and what a case does with each.

#[derive(Debug, Clone, Copy)]
enum Kind {
    Scenario,
    Eval,
    Experiment,
    Deploy,
    ModelMeta,
    ModelWeights,
}

#[derive(Debug, Clone)]
struct Input {
    kind: Kind,
    /// The shipped file it starts from.
    name: String,
    text: String,
}

/// Everything the cases share: a copy of experiments/ and models/default in a temporary
/// directory (so that relative paths resolve as in the repository), the inputs and two
/// observations for models to decide on.
struct Ctx {
    root: PathBuf,
    inputs: Vec<Input>,
    weights: Vec<u8>,
    obs: Vec<Observation>,
    seed: u64,
}

/// Which inputs a run mutates.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Inputs {
    /// Scenarios, eval and experiment configs, model.json and actor.bpk.
    Mine,
    /// Deploy configs only.
    Deploy,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

fn observation(scenario: &Path) -> Observation {
    let s = Scenario::load(scenario).unwrap();
    let mut env = SimEnv::new(s, SimConfig { interval_us: 1000, ..SimConfig::default() }, None).unwrap();
    env.reset(1).unwrap().0
}

impl Ctx {
    fn new(root: &Path, seed: u64, which: Inputs) -> Ctx {
        let ex = repo().join("experiments");
        let (r_ex, r_models) = (root.join("experiments"), root.join("models"));
        copy_dir(&ex.join("scenarios"), &r_ex.join("scenarios"));
        copy_dir(&ex.join("eval"), &r_ex.join("eval"));
        copy_dir(&ex.join("deploy"), &r_ex.join("deploy"));
        copy_dir(&ex, &r_ex);
        copy_dir(&repo().join("models/default"), &r_models.join("default"));
        // A valid trace for mutations that switch a flow to `process = "trace"`.
        std::fs::write(r_ex.join("scenarios/trace.csv"), "time_s,rate_pps\n0,1000\n0.5,20000\n1,0\n")
            .unwrap();
        let mut inputs = vec![];
        let mut add = |kind: Kind, files: Vec<PathBuf>, weight: usize| {
            if (which == Inputs::Deploy) != matches!(kind, Kind::Deploy) {
                return;
            }
            for _ in 0..weight {
                for f in &files {
                    inputs.push(Input {
                        kind,
                        name: f.file_name().unwrap().to_string_lossy().into_owned(),
                        text: std::fs::read_to_string(f).unwrap(),
                    });
                }
            }
        };
        add(Kind::Scenario, toml_files(&ex.join("scenarios")), 2);
        add(Kind::Eval, toml_files(&ex.join("eval")), 2);
        add(Kind::Experiment, toml_files(&ex), 1);
        add(Kind::Deploy, toml_files(&ex.join("deploy")), 2);
        let meta = vec![repo().join("models/default/model.json")];
        add(Kind::ModelMeta, meta.clone(), 8);
        add(Kind::ModelWeights, meta, 2);
        let weights = std::fs::read(repo().join("models/default/actor.bpk")).unwrap();
        let obs = vec![
            observation(&ex.join("scenarios/rr-latency.toml")),
            observation(&ex.join("scenarios/mixed-host.toml")),
        ];
        assert_eq!(obs[1].guests.len(), 2, "mixed-host has two VMs");
        Ctx { root: root.to_path_buf(), inputs, weights, obs, seed }
    }
}

/// How a case ended.
enum End {
    Ok,
    /// A clear error: it names the file.
    Error,
    /// Anything else: an error that does not name the file, or a loaded input that then failed.
    Bad(String),
}

fn clear(e: &anyhow::Error, file: &str) -> End {
    let m = format!("{e:#}");
    if m.contains(file) { End::Error } else { End::Bad(format!("the error does not name {file}: {m}")) }
}

/// Runs case `i`: mutates one input, writes it under the temporary root, loads it and runs it.
/// Returns the end and a description of the input.
fn run_case(ctx: &Ctx, i: usize) -> (End, String) {
    let mut rng = Rng::new(ctx.seed, i as u64);
    let input = rng.pick(&ctx.inputs).clone();
    let stem = format!("case-{i}");
    let ex = ctx.root.join("experiments");
    match input.kind {
        Kind::Scenario | Kind::Eval | Kind::Experiment | Kind::Deploy => {
            let (text, what) = mutate_toml(&mut rng, &input.text);
            let dir = match input.kind {
                Kind::Scenario => ex.join("scenarios"),
                Kind::Eval => ex.join("eval"),
                Kind::Deploy => ex.join("deploy"),
                _ => ex.clone(),
            };
            let path = dir.join(format!("{stem}.toml"));
            std::fs::write(&path, &text).unwrap();
            let desc = format!("{:?} {} ({what}):\n{}", input.kind, input.name, excerpt(&text));
            let end = match input.kind {
                Kind::Scenario => scenario_case(&path, &stem, &mut rng),
                Kind::Eval => eval_case(&path, &stem, &ctx.root),
                Kind::Experiment => match ExperimentConfig::load(&path) {
                    Ok(_) => End::Ok,
                    Err(e) => clear(&e, &stem),
                },
                _ => deploy_case(&path, &stem),
            };
            let _ = std::fs::remove_file(&path);
            (end, desc)
        }
        Kind::ModelMeta | Kind::ModelWeights => {
            let dir = ctx.root.join("models").join(&stem);
            std::fs::create_dir_all(&dir).unwrap();
            let mut weights = ctx.weights.clone();
            let (mut text, mut what, reseal) = match input.kind {
                Kind::ModelMeta => {
                    let (text, what) = mutate_json(&mut rng, &input.text);
                    (text, what, rng.chance(2))
                }
                _ => (input.text.clone(), mutate_bytes(&mut rng, &mut weights), true),
            };
            if reseal {
                text = resealed(&text, &weights);
                what.push_str(" (resealed)");
            }
            std::fs::write(dir.join("model.json"), &text).unwrap();
            std::fs::write(dir.join("actor.bpk"), &weights).unwrap();
            let desc = format!("{:?} ({what}):\n{}", input.kind, excerpt(&text));
            let end = model_case(ctx, &dir, &stem);
            let _ = std::fs::remove_dir_all(&dir);
            (end, desc)
        }
    }
}

fn excerpt(text: &str) -> String {
    let mut end = text.len().min(3000);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn scenario_case(path: &Path, stem: &str, rng: &mut Rng) -> End {
    let s = match Scenario::load(path) {
        Ok(s) => s,
        Err(e) => return clear(&e.into(), stem),
    };
    let cfg = SimConfig { interval_us: 1000, episode_steps: 2, ..SimConfig::default() };
    let name = *rng.pick(&["per-packet", "static:moderate", "dim", "itr"]);
    let mut run = || -> anyhow::Result<()> {
        let mut policy = moderato_policies::baselines::baseline(name, &BTreeMap::new())?;
        let mut env = SimEnv::new(s.clone(), cfg.clone(), Some(controller_factory()))?;
        let (mut obs, _) = env.reset(rng.next())?;
        for _ in 0..2 {
            obs = env.step(&policy.act(&obs))?.obs;
        }
        Ok(())
    };
    match run() {
        Ok(()) => End::Ok,
        Err(e) => End::Bad(format!("loaded, then failed under {name}: {e:#}")),
    }
}

fn eval_case(path: &Path, stem: &str, root: &Path) -> End {
    let suite = match EvalConfig::load(path) {
        Ok(s) => s,
        Err(e) => return clear(&e, stem),
    };
    // Instantiate every policy for the first scenario (models are loaded and checked here).
    let spec = suite.config.sim.spec(suite.scenarios[0].vms.len());
    for p in &suite.policies {
        if matches!(p, PolicySource::BestStatic | PolicySource::BestStaticHeldOut) {
            continue;
        }
        if let Err(e) = p.instantiate(&spec) {
            let m = format!("{e:#}");
            // A model that does not fit the config's sim (or a directory that is no model) is a
            // clear error naming the model's file.
            if !m.contains(&root.display().to_string()) {
                return End::Bad(format!("loaded, then {} failed without naming a file: {m}", p.label()));
            }
        }
    }
    End::Ok
}

fn deploy_case(path: &Path, stem: &str) -> End {
    let cfg = match DeployConfig::load(path) {
        Ok(c) => c,
        Err(e) => return clear(&e, stem),
    };
    // What the deploy command derives from the file before touching a host (no probe: it would
    // resolve and contact its target).
    for role in [Role::Host, Role::Guest] {
        if let Ok(role) = cfg.role(Some(role), path) {
            for r in [cfg.limits(role, path).map(|_| ()), cfg.live_config(role, path).map(|_| ())] {
                if let Err(e) = r
                    && let End::Bad(m) = clear(&e, stem)
                {
                    return End::Bad(m);
                }
            }
        }
    }
    End::Ok
}

fn model_case(ctx: &Ctx, dir: &Path, stem: &str) -> End {
    let mut p = match LearnedPolicy::load(dir, &burn::tensor::Device::flex()) {
        Ok(p) => p,
        Err(e) => return clear(&e.into(), stem),
    };
    for obs in &ctx.obs {
        if p.check_vms(obs.guests.len()).is_ok() {
            let s = p.act(obs);
            if s.vms.len() != obs.guests.len() {
                return End::Bad(format!(
                    "decided for {} VMs on an observation of {}",
                    s.vms.len(),
                    obs.guests.len()
                ));
            }
        }
    }
    End::Ok
}

/// One mutation of the weights file.
fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>) -> String {
    match rng.below(4) {
        0 => {
            let n = rng.below(b.len() + 1);
            b.truncate(n);
            format!("actor.bpk truncated to {n} bytes")
        }
        1 => {
            let k = 1 + rng.below(8);
            for _ in 0..k {
                let i = rng.below(b.len());
                b[i] = b[i].wrapping_add(1 + rng.below(255) as u8);
            }
            format!("actor.bpk: {k} bytes changed")
        }
        2 => {
            // The header: where lengths and names live.
            let k = 1 + rng.below(4);
            for _ in 0..k {
                let i = rng.below(b.len().min(512));
                b[i] = rng.next() as u8;
            }
            format!("actor.bpk: {k} header bytes changed")
        }
        _ => {
            let i = rng.below(b.len());
            let junk: Vec<u8> = (0..1 + rng.below(64)).map(|_| rng.next() as u8).collect();
            b.splice(i..i, junk.iter().copied());
            format!("actor.bpk: {} bytes inserted at {i}", junk.len())
        }
    }
}

/// `text` with the weights and semantics hashes recomputed (where it still parses as a model.json).
fn resealed(text: &str, weights: &[u8]) -> String {
    let Ok(mut meta) = serde_json::from_str::<ModelMeta>(text) else { return text.to_string() };
    meta.provenance.weights_sha256 = hex::encode(Sha256::digest(weights));
    meta.provenance.semantics_sha256 = Some(semantics_sha256(&meta));
    serde_json::to_string_pretty(&meta).unwrap_or_else(|_| text.to_string())
}

// ---------------------------------------------------------------------------------------------
// The harness: workers, a watchdog, a summary.

#[derive(Debug, Default)]
struct Summary {
    cases: usize,
    ok: usize,
    errors: usize,
    panics: Vec<String>,
    unclear: Vec<String>,
    hangs: Vec<String>,
    slowest: Duration,
}

type Running = Option<(usize, Instant)>;

fn fuzz(cases: usize, seed: u64, which: Inputs) -> Summary {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = Arc::new(Ctx::new(tmp.path(), seed, which));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(16);
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Per worker: the case it runs and since when.
    let running: Arc<Mutex<Vec<Running>>> = Arc::new(Mutex::new(vec![None; threads]));
    let summary = Arc::new(Mutex::new(Summary::default()));
    let done = Arc::new(AtomicUsize::new(0));
    // The panic messages are in the summary; keep the log readable.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for w in 0..threads {
        let (ctx, next, stop, running, summary, done) =
            (ctx.clone(), next.clone(), stop.clone(), running.clone(), summary.clone(), done.clone());
        std::thread::spawn(move || {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cases || stop.load(Ordering::Relaxed) {
                    break;
                }
                let t0 = Instant::now();
                running.lock().unwrap()[w] = Some((i, t0));
                let r = catch_unwind(AssertUnwindSafe(|| run_case(&ctx, i)));
                let took = t0.elapsed();
                running.lock().unwrap()[w] = None;
                let mut s = summary.lock().unwrap();
                s.cases += 1;
                s.slowest = s.slowest.max(took);
                match r {
                    Ok((End::Ok, _)) => s.ok += 1,
                    Ok((End::Error, _)) => s.errors += 1,
                    Ok((End::Bad(m), desc)) => {
                        s.unclear.push(format!("case {i} (seed {}): {m}\n{desc}", ctx.seed))
                    }
                    Err(p) => {
                        let m = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        // Replay the input for the report.
                        let desc = catch_unwind(AssertUnwindSafe(|| describe(&ctx, i))).unwrap_or_default();
                        s.panics.push(format!("case {i} (seed {}): panic: {m}\n{desc}", ctx.seed));
                    }
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
        });
    }
    // The watchdog: a case running longer than the bound is a hang; stop handing out cases and
    // report it (its thread is left behind; the test process ends with the test).
    while done.load(Ordering::Relaxed) < threads {
        std::thread::sleep(Duration::from_millis(50));
        let hung: Vec<usize> = running
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .filter(|(_, t0)| t0.elapsed() > CASE_BOUND)
            .map(|(i, _)| *i)
            .collect();
        if !hung.is_empty() {
            stop.store(true, Ordering::Relaxed);
            let mut s = summary.lock().unwrap();
            for i in hung {
                s.hangs.push(format!(
                    "case {i} (seed {seed}): still running after {CASE_BOUND:?}\n{}",
                    describe(&ctx, i)
                ));
            }
            break;
        }
    }
    std::panic::set_hook(hook);
    let s = std::mem::take(&mut *summary.lock().unwrap());
    // The hung thread may still use the directory; leave it rather than delete under it.
    if !s.hangs.is_empty() {
        std::mem::forget(tmp);
    }
    s
}

/// The input of case `i`, regenerated from its seed (cheap: the mutation only).
fn describe(ctx: &Ctx, i: usize) -> String {
    let mut rng = Rng::new(ctx.seed, i as u64);
    let input = rng.pick(&ctx.inputs).clone();
    match input.kind {
        Kind::ModelMeta => {
            format!("{:?} {}: {}", input.kind, input.name, mutate_json(&mut rng, &input.text).1)
        }
        Kind::ModelWeights => {
            format!("{:?}: {}", input.kind, mutate_bytes(&mut rng, &mut ctx.weights.clone()))
        }
        _ => {
            let (text, what) = mutate_toml(&mut rng, &input.text);
            format!("{:?} {} ({what}):\n{}", input.kind, input.name, excerpt(&text))
        }
    }
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn check(cases: usize, which: Inputs) {
    let seed = env_usize("MODERATO_FUZZ_SEED", 14) as u64;
    let t0 = Instant::now();
    let s = fuzz(cases, seed, which);
    println!(
        "fuzz {which:?}: {} cases (seed {seed}) in {:.1} s: {} ok, {} clean errors, {} panics, {} hangs, {} unclear; slowest case {:.2} s",
        s.cases,
        t0.elapsed().as_secs_f64(),
        s.ok,
        s.errors,
        s.panics.len(),
        s.hangs.len(),
        s.unclear.len(),
        s.slowest.as_secs_f64()
    );
    // Panics grouped by message, so that one bug hit a thousand times reads as one.
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &s.panics {
        let m = p.lines().next().unwrap_or("").split_once("panic: ").map_or("", |x| x.1);
        *kinds.entry(m).or_default() += 1;
    }
    for (m, n) in &kinds {
        println!("  {n} × panic: {m}");
    }
    let bad: Vec<&String> = s.hangs.iter().chain(&s.panics).chain(&s.unclear).collect();
    assert!(
        bad.is_empty(),
        "{} of {} cases failed; the first ones:\n\n{}",
        bad.len(),
        s.cases,
        bad.iter().take(5).map(|b| b.as_str()).collect::<Vec<_>>().join("\n\n---\n\n")
    );
    assert_eq!(s.cases, cases, "every case ran");
    // The mutations must reach past the parsers, or the fuzzing proves little.
    assert!(
        s.ok * 20 >= cases,
        "only {} of {cases} mutated inputs loaded: the mutations are too blunt",
        s.ok
    );
    assert!(s.errors * 4 >= cases, "only {} of {cases} mutated inputs were refused", s.errors);
}

#[test]
fn mutated_shipped_inputs_end_in_success_or_a_clear_error() {
    check(env_usize("MODERATO_FUZZ_CASES", CI_CASES).min(CI_CASES * 5), Inputs::Mine);
}

/// The deploy configs (experiments/deploy/*.toml) through the same mutations (an empty file used
/// to panic in the deploy config's error path).
#[test]
fn mutated_deploy_configs_end_in_success_or_a_clear_error() {
    check(env_usize("MODERATO_FUZZ_CASES", CI_CASES / 2), Inputs::Deploy);
}

/// The long run the README reports (about 10^5 cases).
#[test]
#[ignore = "long: MODERATO_FUZZ_CASES=100000 cargo test --release -p moderato-agent --test fuzz_inputs -- --ignored --nocapture"]
fn fuzz_long_run() {
    check(env_usize("MODERATO_FUZZ_CASES", 100_000), Inputs::Mine);
}

#[test]
fn the_generator_is_deterministic() {
    let text = std::fs::read_to_string(repo().join("experiments/scenarios/rr-latency.toml")).unwrap();
    let a = mutate_toml(&mut Rng::new(3, 9), &text);
    let b = mutate_toml(&mut Rng::new(3, 9), &text);
    assert_eq!(a, b);
    let c = mutate_toml(&mut Rng::new(3, 10), &text);
    assert_ne!(a, c);
}
