//! What the simulated programs are: the functions workers link, the one service type, the
//! resources nodes have and tasks ask for, and the values tasks return. Every value is derived
//! from the function and its arguments, so the driver that submitted a task knows the right
//! answer before any worker computes it, and tells a wrong or misrouted value from the right one.

use super::rng::{Rng, mix64};
use crate::INLINE_RESULT_BYTES;
use crate::scheduler::SERVICE_FUNCTION_PREFIX;
use chia_core::protocol::{Outcome, WatchRule};
use chia_core::{FunctionKey, Resources, TaskError, signature_hash};

/// How a function ends, given its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Behaviour {
    /// Always a value.
    Pure,
    /// An application error for one input in five, on every attempt.
    FailsSometimes,
    /// An application error on the first attempt for one input in three: a retry with
    /// `retry_exceptions` succeeds.
    FailsFirstAttempt,
    /// A value larger than [`INLINE_RESULT_BYTES`], so its owner is told `Stored` and fetches it.
    Large,
}

pub(crate) struct FunctionDef {
    pub(crate) name: &'static str,
    pub(crate) behaviour: Behaviour,
    /// How long a run takes, in microseconds of virtual time.
    pub(crate) run_us: (u64, u64),
    /// How often drivers call it, relative to the others.
    pub(crate) weight: u32,
}

pub(crate) const FUNCTIONS: &[FunctionDef] = &[
    FunctionDef { name: "add", behaviour: Behaviour::Pure, run_us: (500, 20_000), weight: 100 },
    FunctionDef { name: "mul", behaviour: Behaviour::Pure, run_us: (500, 20_000), weight: 60 },
    FunctionDef { name: "concat", behaviour: Behaviour::Pure, run_us: (5_000, 50_000), weight: 40 },
    FunctionDef { name: "risky", behaviour: Behaviour::FailsSometimes, run_us: (500, 20_000), weight: 30 },
    FunctionDef { name: "flaky", behaviour: Behaviour::FailsFirstAttempt, run_us: (500, 20_000), weight: 30 },
    FunctionDef { name: "slow", behaviour: Behaviour::Pure, run_us: (100_000, 600_000), weight: 10 },
    FunctionDef { name: "blob", behaviour: Behaviour::Large, run_us: (5_000, 30_000), weight: 1 },
];

/// The index of the function no worker links (its calls fail with `UnknownFunction`, or wait
/// while no node runs tasks).
pub(crate) const GHOST: usize = FUNCTIONS.len();

/// The simulated service type's methods; both are pure, so a call's value can be checked.
pub(crate) const METHODS: &[&str] = &["echo", "sum"];
pub(crate) const SERVICE_NAMES: &[&str] = &["alpha", "beta", "gamma"];
pub(crate) const NAMESPACES: &[&str] = &["default", "other"];
const SERVICE_TYPE: &str = "Counter";

/// Requests of function tasks: `(resources, weight)`. The reference worker (slot 0) can hold
/// every one of them except the last, which no worker ever can.
const REQUESTS: &[(&str, u32)] = &[
    ("CPU=1", 40),
    ("CPU=0.5", 20),
    ("CPU=0.25", 10),
    ("CPU=1,adder=1", 15),
    ("adder=2", 5),
    ("CPU=2,gpu=1", 5),
    ("", 4),
    ("CPU=8", 1),
];
/// Requests of service instances (all fit the reference worker).
const SERVICE_REQUESTS: &[&str] = &["CPU=0.5", "svc=1", ""];
/// What the reference worker offers: room for every request above but the infeasible one.
const REFERENCE_CAPACITY: &str = "CPU=4,adder=2,gpu=1,svc=2";
/// Bundles of placement groups: `(resources, weight)`. Each fits the reference worker; groups
/// of several may not fit any node as their strategy asks.
const BUNDLES: &[(&str, u32)] = &[
    ("CPU=1", 15),
    ("CPU=0.5", 10),
    ("CPU=2", 25),
    ("CPU=0.5,gpu=1", 20),
    ("CPU=1,adder=1", 10),
    ("CPU=1.5", 10),
    ("adder=1", 5),
    ("svc=1", 5),
];
/// A bundle no worker can ever hold: a group with it is infeasible on purpose.
const TOO_LARGE_BUNDLE: &str = "CPU=8";

/// Keys and resources parsed once per run.
pub(crate) struct Catalog {
    /// By function index, [`GHOST`] last.
    pub(crate) functions: Vec<FunctionKey>,
    /// The same names with another signature (another build of the worker).
    pub(crate) other_builds: Vec<FunctionKey>,
    pub(crate) service: FunctionKey,
    pub(crate) other_service: FunctionKey,
    pub(crate) requests: Vec<Resources>,
    pub(crate) request_weights: Vec<u32>,
    pub(crate) service_requests: Vec<Resources>,
    pub(crate) function_weights: Vec<u32>,
    /// Bundles of placement groups, and how often drivers reserve each.
    pub(crate) bundles: Vec<Resources>,
    pub(crate) bundle_weights: Vec<u32>,
    /// A bundle larger than any worker.
    pub(crate) too_large_bundle: Resources,
    reference_capacity: Resources,
}

fn parse(text: &str) -> Resources {
    Resources::parse(text).unwrap_or_else(|e| panic!("the simulator's resource list {text:?}: {e}"))
}

impl Catalog {
    pub(crate) fn new() -> Catalog {
        let key = |name: &str, build: u32| {
            FunctionKey::new(name, signature_hash(&format!("{name}(sim build {build})")))
        };
        let mut functions: Vec<FunctionKey> = FUNCTIONS.iter().map(|f| key(f.name, 1)).collect();
        functions.push(key("ghost", 1));
        let other_builds = FUNCTIONS.iter().map(|f| key(f.name, 2)).collect();
        Catalog {
            functions,
            other_builds,
            service: key(SERVICE_TYPE, 1),
            other_service: key(SERVICE_TYPE, 2),
            requests: REQUESTS.iter().map(|(text, _)| parse(text)).collect(),
            request_weights: REQUESTS.iter().map(|&(_, w)| w).collect(),
            service_requests: SERVICE_REQUESTS.iter().map(|text| parse(text)).collect(),
            function_weights: FUNCTIONS.iter().map(|f| f.weight).collect(),
            bundles: BUNDLES.iter().map(|(text, _)| parse(text)).collect(),
            bundle_weights: BUNDLES.iter().map(|&(_, w)| w).collect(),
            too_large_bundle: parse(TOO_LARGE_BUNDLE),
            reference_capacity: parse(REFERENCE_CAPACITY),
        }
    }

    /// Whether some worker can ever hold `request` (the reference worker always comes back).
    pub(crate) fn feasible(&self, request: usize) -> bool {
        self.reference_capacity.covers(&self.requests[request])
    }

    /// The function nodes offer to host instances of `service_type`.
    pub(crate) fn instance_key(service_type: &FunctionKey) -> FunctionKey {
        FunctionKey::new(
            format!("{SERVICE_FUNCTION_PREFIX}{}", service_type.name),
            service_type.sig_hash.clone(),
        )
    }

    /// What worker `slot` links and has. Slot 0 is the reference worker: every function and the
    /// service of the drivers' build, room for every feasible request, so every task that can
    /// run eventually does. The others are random; some were built from other code (another
    /// signature for a function or the service).
    pub(crate) fn offer(&self, slot: usize, rng: &mut Rng) -> Offer {
        if slot == 0 {
            return Offer {
                labels: labels_of(0, true),
                capacity: self.reference_capacity.clone(),
                functions: (0..FUNCTIONS.len()).map(|_| Some(Build::Same)).collect(),
                service: Some(Build::Same),
            };
        }
        let mut capacity = Resources::new();
        let cpu = rng.range(1, 8) * chia_core::ResourceAmount::SCALE / 2;
        let _ = capacity.set("CPU", chia_core::ResourceAmount::from_fixed(cpu));
        for (name, max, per_mille) in [("adder", 3, 500), ("gpu", 1, 300), ("svc", 2, 500)] {
            if rng.chance(per_mille) {
                let _ = capacity.set(name, chia_core::ResourceAmount::whole(rng.range(1, max)));
            }
        }
        let build = |rng: &mut Rng, per_mille| {
            rng.chance(per_mille).then(|| if rng.chance(100) { Build::Other } else { Build::Same })
        };
        let functions = (0..FUNCTIONS.len()).map(|_| build(rng, 600)).collect();
        let service = build(rng, 500);
        // From the slot, not the random stream: the seeds' runs stay what they were.
        Offer { labels: labels_of(slot, slot % 4 == 1), capacity, functions, service }
    }
}

fn labels_of(slot: usize, fpga: bool) -> chia_core::placement::Labels {
    let mut text = format!("rack=r{}", slot % 3);
    if slot == 0 {
        text.push_str(",ref=yes");
    }
    if fpga {
        text.push_str(",fpga=vu9p");
    }
    chia_core::placement::Labels::parse(&text)
        .unwrap_or_else(|e| panic!("the simulator's labels {text:?}: {e}"))
}

/// Which build of a function or service a worker links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Build {
    /// The drivers' build: same signature.
    Same,
    /// Another build: same name, another signature.
    Other,
}

/// Labels calls ask for, by index: each is offered by the reference worker (slot 0), so a
/// call asking for one always has somewhere to run, and by some other workers.
pub(crate) const LABEL_ASKS: [&str; 3] = ["rack=r0", "ref=yes", "rack=r0,fpga=vu9p"];

/// What a worker offers when it joins.
#[derive(Clone, Debug)]
pub(crate) struct Offer {
    /// Its labels: `rack=r<slot mod 3>`, the reference worker's `ref=yes` and `fpga=vu9p`,
    /// and `fpga=vu9p` on every fourth other worker.
    pub(crate) labels: chia_core::placement::Labels,
    pub(crate) capacity: Resources,
    /// By function index (never [`GHOST`]).
    pub(crate) functions: Vec<Option<Build>>,
    pub(crate) service: Option<Build>,
}

impl Offer {
    pub(crate) fn function_keys(&self, catalog: &Catalog) -> Vec<FunctionKey> {
        let mut keys = Vec::new();
        for (f, build) in self.functions.iter().enumerate() {
            match build {
                Some(Build::Same) => keys.push(catalog.functions[f].clone()),
                Some(Build::Other) => keys.push(catalog.other_builds[f].clone()),
                None => {}
            }
        }
        keys
    }

    pub(crate) fn service_keys(&self, catalog: &Catalog) -> Vec<FunctionKey> {
        match self.service {
            Some(Build::Same) => vec![catalog.service.clone()],
            Some(Build::Other) => vec![catalog.other_service.clone()],
            None => Vec::new(),
        }
    }

    /// Every key the scheduler knows this node by (service types as `service:<Type>`).
    pub(crate) fn scheduler_keys(&self, catalog: &Catalog) -> Vec<FunctionKey> {
        let mut keys = self.function_keys(catalog);
        keys.extend(self.service_keys(catalog).iter().map(Catalog::instance_key));
        keys
    }
}

/// A 64-bit digest of a value (not cryptographic: it tells values apart, it does not resist
/// an adversary).
pub(crate) fn digest(bytes: &[u8]) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = mix64(h ^ u64::from_le_bytes(word));
    }
    let mut last = [0u8; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    mix64(h ^ u64::from_le_bytes(last) ^ (bytes.len() as u64).rotate_left(32))
}

/// The seed of a result: what the function is and what it was given.
pub(crate) fn result_seed(salt: u64, arg_digests: impl IntoIterator<Item = u64>) -> u64 {
    arg_digests.into_iter().fold(mix64(salt.wrapping_add(0x5eed)), |h, d| mix64(h ^ d))
}

fn value_len(behaviour: Behaviour, seed: u64) -> usize {
    match behaviour {
        Behaviour::Large => INLINE_RESULT_BYTES + 1 + (seed % 4096) as usize,
        _ => 8 + (seed % 25) as usize,
    }
}

pub(crate) fn value_bytes(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// How a task's owner expects it to end if nothing goes wrong around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expected {
    pub(crate) digest: u64,
    pub(crate) len: u32,
    pub(crate) failure: ExpectedFailure,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExpectedFailure {
    Never,
    /// On every attempt.
    Always,
    /// On the first attempt only.
    FirstAttempt,
}

impl FunctionDef {
    fn seed(f: usize, arg_digests: &[u64]) -> u64 {
        result_seed(f as u64, arg_digests.iter().copied())
    }

    fn fails(&self, seed: u64) -> ExpectedFailure {
        match self.behaviour {
            Behaviour::FailsSometimes if seed.is_multiple_of(5) => ExpectedFailure::Always,
            Behaviour::FailsFirstAttempt if seed.is_multiple_of(3) => ExpectedFailure::FirstAttempt,
            _ => ExpectedFailure::Never,
        }
    }
}

/// What function `f` returns for arguments with these digests, as its caller predicts it.
pub(crate) fn expect(f: usize, arg_digests: &[u64]) -> Expected {
    let def = &FUNCTIONS[f];
    let seed = FunctionDef::seed(f, arg_digests);
    let len = value_len(def.behaviour, seed);
    Expected { digest: digest(&value_bytes(seed, len)), len: len as u32, failure: def.fails(seed) }
}

/// What function `f` does on a worker, run `attempt` with these argument values.
pub(crate) fn run_function(f: usize, args: &[Vec<u8>], attempt: u32) -> Outcome {
    let def = &FUNCTIONS[f];
    let digests: Vec<u64> = args.iter().map(|a| digest(a)).collect();
    let seed = FunctionDef::seed(f, &digests);
    let fails = match def.fails(seed) {
        ExpectedFailure::Never => false,
        ExpectedFailure::Always => true,
        ExpectedFailure::FirstAttempt => attempt <= 1,
    };
    if fails {
        return Outcome::Failed(TaskError::Application {
            function: def.name.to_string(),
            message: format!("no luck with input {seed:016x} on attempt {attempt}"),
        });
    }
    Outcome::Value(value_bytes(seed, value_len(def.behaviour, seed)))
}

/// The salt of method `m`'s results, apart from every function's.
fn method_salt(m: usize) -> u64 {
    0x5e41_1ce0_0000 + m as u64
}

/// What method `m` of the service returns for these arguments (both methods are pure).
pub(crate) fn expect_method(m: usize, arg_digests: &[u64]) -> (u64, u32) {
    let seed = result_seed(method_salt(m), arg_digests.iter().copied());
    let len = value_len(Behaviour::Pure, seed);
    (digest(&value_bytes(seed, len)), len as u32)
}

pub(crate) fn run_method(m: usize, args: &[Vec<u8>]) -> Vec<u8> {
    let seed = result_seed(method_salt(m), args.iter().map(|a| digest(a)));
    value_bytes(seed, value_len(Behaviour::Pure, seed))
}

/// What a service constructor is told: which instance it is (the worker records it to check
/// names stay unique), whether it fails, and whether it watches results (as the cache does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Constructor {
    /// `namespace/name`.
    pub(crate) name: String,
    pub(crate) fails: bool,
    pub(crate) watches: bool,
}

impl Constructor {
    pub(crate) fn args(&self) -> Vec<Vec<u8>> {
        vec![self.name.clone().into_bytes(), vec![u8::from(self.fails) | u8::from(self.watches) << 1]]
    }

    pub(crate) fn read(args: &[Vec<u8>]) -> Option<Constructor> {
        let [name, flags] = args else { return None };
        let flags = *flags.first()?;
        Some(Constructor {
            name: String::from_utf8(name.clone()).ok()?,
            fails: flags & 1 != 0,
            watches: flags & 2 != 0,
        })
    }
}

/// The settings a driver sends as revision `revision` of its job (opaque to the head).
pub(crate) fn job_settings(revision: u64) -> Vec<u8> {
    format!("bypass plan, revision {revision}").into_bytes()
}

/// Tags drivers put on some calls; watchers ask for some of them.
pub(crate) const TAGS: &[&str] = &["t0", "t1", "t2", "t3", "t4", "t5", "t6"];

/// The method a watching service is sent results on (the cache's `write`).
pub(crate) const WATCH_METHOD: &str = "write";

/// What watchers ask for: `add` results tagged `t0`..`t3` (as a whole-match pattern), and
/// every tagged `blob` result.
pub(crate) fn watch_rules() -> Vec<WatchRule> {
    vec![
        WatchRule { function: "add".into(), tags: Some(vec!["t[0-3]".into()]) },
        WatchRule { function: "blob".into(), tags: None },
    ]
}

/// Whether a result of function `f` tagged `tag` is one watchers ask for: [`watch_rules`],
/// worked out apart from the head's pattern matching.
pub(crate) fn watched(f: usize, tag: &str) -> bool {
    match FUNCTIONS.get(f).map(|def| def.name) {
        Some("add") => matches!(tag.as_bytes(), [b't', b'0'..=b'3']),
        Some("blob") => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_match_what_workers_compute() {
        let mut rng = Rng::new(3);
        for f in 0..FUNCTIONS.len() {
            for _ in 0..20 {
                let args: Vec<Vec<u8>> = (0..rng.below(3))
                    .map(|_| {
                        let len = rng.below(9) as usize;
                        rng.bytes(len)
                    })
                    .collect();
                let digests: Vec<u64> = args.iter().map(|a| digest(a)).collect();
                let expected = expect(f, &digests);
                match run_function(f, &args, 2) {
                    Outcome::Value(v) => {
                        assert_eq!((digest(&v), v.len() as u32), (expected.digest, expected.len));
                        assert_ne!(expected.failure, ExpectedFailure::Always);
                    }
                    Outcome::Failed(_) => assert_eq!(expected.failure, ExpectedFailure::Always),
                }
            }
        }
        assert_ne!(digest(b"a"), digest(b"a\0"), "lengths are part of the digest");
    }
}
