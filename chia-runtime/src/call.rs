//! [`Call`]: a function call being built — its tag, resources, retries and timeout — and sent. Sending
//! is where the caller decides bypass, so `Call` sits above the services ([`crate::bypass`]),
//! which are themselves built on the [`Context`] a call is submitted through.

use crate::driver::context::{ArgInput, Context, ObjectRef, send_request};
use crate::driver::job::JobLink;
use crate::driver::placement::PlacementGroup;
use crate::driver::registry::FunctionSpec;
use crate::error::Error;
use crate::services::bypass;
use chia_bypass::{Decision, RunReason};
use chia_core::placement::{Placement, Strategy};
use chia_core::protocol::{PeerToHead, TaskSpec};
use chia_core::resources::CPU;
use chia_core::{Resources, Retries};
use serde::de::DeserializeOwned;
use std::marker::PhantomData;
use std::time::Duration;

/// A call being built: set a tag or options, then [`Call::remote`].
///
/// ```
/// # extern crate chia_runtime as chia;
/// #[chia::function(resources(adder = 1))]
/// fn simple_add(x: i64, y: i64) -> i64 {
///     x + y
/// }
///
/// # #[tokio::main] async fn main() -> Result<(), chia::Error> {
/// let cx = chia::Init::new().local_resources("CPU=2,adder=1").connect().await?;
/// let sum = simple_add::call(1, 2).tag("iter0").num_cpus(2.0).resource("adder", 0.5).remote(&cx);
/// assert_eq!(sum.get().await?, 3);
/// # Ok(()) }
/// ```
#[must_use = "a call does nothing until .remote(&cx)"]
pub struct Call<T> {
    spec: &'static FunctionSpec,
    args: Vec<ArgInput>,
    tag: Option<String>,
    request: Resources,
    max_retries: Retries,
    retry_exceptions: bool,
    timeout: Option<Duration>,
    placement: Placement,
    invalid: Option<String>,
    _type: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Call<T> {
    /// Used by `#[chia::function]` (through `__private::new_call`); users start from
    /// `my_function::call(..)`.
    pub(crate) fn new(spec: &'static FunctionSpec, args: Vec<ArgInput>) -> Call<T> {
        Call {
            spec,
            args,
            tag: None,
            request: spec.request(),
            max_retries: spec.max_retries,
            retry_exceptions: spec.retry_exceptions,
            timeout: spec.timeout,
            placement: Placement::default(),
            invalid: None,
            _type: PhantomData,
        }
    }

    /// Sets the per-call tag (CHIA's `_chia_tag`), used by the cache and bypass.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Overrides how many CPUs this call needs (0 allowed; at most 4 decimals).
    pub fn num_cpus(self, cpus: f64) -> Self {
        self.resource(CPU, cpus)
    }

    /// Overrides the amount of one resource for this call (0 removes it).
    pub fn resource(mut self, name: &str, amount: f64) -> Self {
        crate::util::ask_resource(&mut self.request, &mut self.invalid, "resource", name, amount);
        self
    }

    /// Overrides how many times this call runs again after its worker is lost (default
    /// `Retries::UpTo(3)`, as in Ray; `Retries::Forever`: no limit; `Retries::Never`). When the
    /// attempts run out, `get` says the worker died and how many attempts were made.
    pub fn max_retries(mut self, retries: Retries) -> Self {
        self.max_retries = retries;
        self
    }

    /// Whether an application error (an `Err`, a panic) or a run stopped by its timeout also
    /// makes this call run again, within `max_retries` (default: the function's
    /// `retry_exceptions`, itself default false).
    pub fn retry_exceptions(mut self, retry: bool) -> Self {
        self.retry_exceptions = retry;
        self
    }

    /// Overrides the function's `timeout_s` for this call: a run that takes longer than
    /// `limit` (counted on its worker from when the run starts) is cancelled with force — its
    /// processes killed — and fails with `TaskError::TimedOut`, run again first if the call
    /// has `retry_exceptions` and retries left. Precise to the millisecond (a fraction of one
    /// rounds up); `Duration::ZERO` makes the call invalid (use [`Call::no_timeout`] for none).
    pub fn timeout(mut self, limit: Duration) -> Self {
        if limit.is_zero() {
            self.invalid.get_or_insert_with(|| {
                "a timeout must be longer than 0 (.no_timeout() runs the call without one)".to_string()
            });
        }
        self.timeout = Some(limit);
        self
    }

    /// Runs this call without a timeout, whatever the function's `timeout_s`.
    pub fn no_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }

    /// Runs this call only on a node whose worker offers the label `key` with this `value`
    /// (`--labels key=value`); several labels must all match. A call no connected node
    /// matches waits, reported infeasible, and `chia explain` names the label each node lacks.
    /// A malformed label makes the call invalid (`InvalidCall`, nothing sent).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        if let Err(e) = self.placement.labels.insert(key, value) {
            self.invalid.get_or_insert_with(|| e.to_string());
        }
        self
    }

    /// How the scheduler picks among the nodes that could run this call now: `Spread` (the
    /// one running the fewest tasks), `Pack` (the one running the most), or `Default` (round
    /// robin per kind of call, what the scheduler does without being asked).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.placement.strategy = strategy;
        self
    }

    /// Runs this call inside bundle `bundle` of `group`: on the bundle's node, using only
    /// what the bundle reserved (the call's own request must fit in it, or it fails with
    /// `TaskError::PlacementGroup`). It waits while the group is not placed yet.
    pub fn in_group(mut self, group: &PlacementGroup, bundle: usize) -> Self {
        match group.bundle_ref(Some(bundle)) {
            Ok(bundle) => self.placement.group = Some(bundle),
            Err(message) => {
                self.invalid.get_or_insert(message);
            }
        }
        self
    }

    /// Runs this call inside whichever bundle of `group` has room for it.
    pub fn in_any_bundle(mut self, group: &PlacementGroup) -> Self {
        if let Ok(bundle) = group.bundle_ref(None) {
            self.placement.group = Some(bundle);
        }
        self
    }

    /// Submits the call and returns its `ObjectRef` at once.
    ///
    /// When the job has a bypass plan that bypasses this call and registers a condition for
    /// it, the condition runs here first, on this thread (see [`crate::bypass`]).
    pub fn remote(self, cx: &Context) -> ObjectRef<T> {
        self.remote_with_decision(cx).0
    }

    /// Like [`Call::remote`], and says how the call was dispatched: run for real (and why), or
    /// bypassed (and by what).
    pub fn remote_with_decision(self, cx: &Context) -> (ObjectRef<T>, Decision) {
        let Call {
            spec,
            mut args,
            tag,
            request,
            max_retries,
            retry_exceptions,
            timeout,
            placement,
            mut invalid,
            ..
        } = self;
        if let JobLink::Own(own) = cx.job() {
            // Before the job's first submission, on the same stream: its tasks then name it. If
            // this cannot be sent the connection is gone, and the submission fails saying so.
            let _ = own.announce(cx.client());
        }
        let (decision, bypass) = match invalid {
            // An invalid call fails as it is; there is nothing to decide.
            Some(_) => (Decision::Run(RunReason::NotBypassed), None),
            None => match bypass::decide(cx, spec.name, tag.as_deref(), &mut args) {
                Ok(decided) => decided,
                Err(message) => {
                    invalid = Some(message);
                    (Decision::Run(RunReason::NotBypassed), None)
                }
            },
        };
        let job = cx.job().nested_in();
        let object = send_request(cx, spec.name, args, invalid, |task, args| {
            PeerToHead::Submit(TaskSpec {
                task,
                function: spec.key(),
                args,
                request,
                tag,
                max_retries,
                retry_exceptions,
                bypass: bypass.map(Box::new),
                job,
                timeout_ms: timeout.map(whole_millis),
                placement: placement.boxed(),
            })
        });
        (object, decision)
    }

    /// What [`Call::remote`] would decide for this call now, without submitting anything: run
    /// for real (and why) or bypassed (and by what) — the whole decision, its condition
    /// included (it runs here, on this thread, as it would for the call). The original's
    /// `is_bypassed(fn, tag)`; the call can still be sent afterwards.
    pub fn bypass_decision(&mut self, cx: &Context) -> Result<Decision, Error> {
        let invalid = |message: String| {
            Error::Task(chia_core::TaskError::InvalidCall { function: self.spec.name.to_string(), message })
        };
        if let Some(message) = &self.invalid {
            return Err(invalid(message.clone()));
        }
        match bypass::decide(cx, self.spec.name, self.tag.as_deref(), &mut self.args) {
            Ok((decision, _)) => Ok(decision),
            Err(message) => Err(invalid(message)),
        }
    }

    /// Submits the call and blocks until its result is ready.
    pub fn remote_blocking(self, cx: &Context) -> Result<T, Error> {
        self.remote(cx).get_blocking()
    }
}

/// A timeout in whole milliseconds, as it travels: a fraction of one rounds up, so a limit
/// of a few microseconds is not sent as none at all.
fn whole_millis(limit: Duration) -> u64 {
    let millis = limit.as_nanos().div_ceil(1_000_000);
    u64::try_from(millis).unwrap_or(u64::MAX)
}

// Here, not in `bypass`: asking about a call needs the call, which sits above the services.
impl bypass::Bypass {
    /// Whether `call` would be bypassed now under this plan, without submitting it (the
    /// original's `is_bypassed(fn, tag)`): [`Call::bypass_decision`] on this bypass's driver,
    /// whose [`Decision`] also says why.
    pub fn is_bypassed<T: DeserializeOwned>(&self, call: &mut Call<T>) -> Result<bool, Error> {
        call.bypass_decision(self.context()).map(|decision| decision.is_bypassed())
    }
}

#[cfg(test)]
mod tests {
    use super::whole_millis;
    use std::time::Duration;

    #[test]
    fn timeouts_travel_in_whole_milliseconds_rounded_up() {
        assert_eq!(whole_millis(Duration::from_millis(2500)), 2500);
        assert_eq!(whole_millis(Duration::from_micros(1)), 1);
        assert_eq!(whole_millis(Duration::from_micros(1500)), 2);
        assert_eq!(whole_millis(Duration::MAX), u64::MAX);
    }
}
