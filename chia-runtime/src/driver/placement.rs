//! Placement groups (the original's colocated groups, Ray's placement groups): bundles of
//! resources reserved together — on one node ([`PlacementStrategy::StrictPack`], `Pack`) or on
//! distinct nodes ([`PlacementStrategy::StrictSpread`], `Spread`) — for a family of calls and
//! services to run in ([`Call::in_group`](crate::Call::in_group),
//! [`ServiceOptions::in_group`](crate::ServiceOptions::in_group)).
//!
//! ```
//! # extern crate chia_runtime as chia;
//! use chia::placement::{Bundle, PlacementGroup, PlacementStrategy};
//!
//! #[chia::function]
//! fn where_am_i(cx: &chia::Context) -> String {
//!     cx.node_name().to_string()
//! }
//!
//! # #[tokio::main(flavor = "multi_thread")]
//! # async fn main() -> Result<(), chia::Error> {
//! let cx = chia::Init::new().local_workers(2).local_resources("CPU=2").connect().await?;
//! let bundles = [Bundle::new().cpus(1.0), Bundle::new().cpus(1.0)];
//! let group = PlacementGroup::create(&cx, bundles, PlacementStrategy::StrictSpread);
//! let nodes = group.ready().await?; // the node of each bundle: two distinct nodes
//! assert_ne!(nodes[0], nodes[1]);
//! let here = where_am_i::call().in_group(&group, 1).remote(&cx).get().await?;
//! assert_eq!(here, nodes[1]);
//! group.remove().await?;
//! # Ok(()) }
//! ```
//!
//! The head decides where bundles go and keeps each group's reservation: a bundle's resources
//! leave its node's free pool and only tasks in that bundle use them. A group is placed whole
//! or not at all; until then calls in it wait. [`PlacementGroup::ready`] fails with
//! `TaskError::PlacementGroup` naming why when the connected nodes could never hold the group
//! as its strategy asks (it stays pending in case a node that can joins). A group ends with
//! the job that created it unless created detached; removing it cancels the calls running in
//! it and fails those queued.

use crate::driver::context::{Context, ObjectRef, send_request};
use crate::error::Error;
use chia_core::Resources;
use chia_core::placement::{BundleRef, GroupId, GroupSpec};
use chia_core::protocol::PeerToHead;
use chia_core::resources::CPU;

pub use chia_core::placement::{
    GroupProblem, GroupStrategy as PlacementStrategy, LabelError, Labels, Strategy,
};

/// What one bundle of a group reserves on its node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bundle {
    resources: Resources,
    invalid: Option<String>,
}

impl Bundle {
    /// A bundle reserving nothing yet (a group refuses an empty bundle).
    pub fn new() -> Bundle {
        Bundle::default()
    }

    /// Reserves `cpus` CPUs (at most 4 decimals).
    pub fn cpus(self, cpus: f64) -> Bundle {
        self.resource(CPU, cpus)
    }

    /// Reserves `amount` of the resource `name`.
    pub fn resource(mut self, name: &str, amount: f64) -> Bundle {
        crate::util::ask_resource(&mut self.resources, &mut self.invalid, "bundle resource", name, amount);
        self
    }

    /// What it reserves.
    pub fn resources(&self) -> &Resources {
        &self.resources
    }
}

impl From<Resources> for Bundle {
    fn from(resources: Resources) -> Bundle {
        Bundle { resources, invalid: None }
    }
}

/// A placement group: see the [module documentation](self).
pub struct PlacementGroup {
    id: GroupId,
    bundles: Vec<Resources>,
    strategy: PlacementStrategy,
    cx: Context,
    /// The head's answer to the creation (at once: `()`, or why the group was refused).
    created: ObjectRef<()>,
}

impl PlacementGroup {
    /// Creates a group of `bundles` laid out by `strategy`, ending with this job. Returns at
    /// once (no round trip): calls can be placed in it right away and wait until it is
    /// placed; [`PlacementGroup::ready`] waits for that, or says why it cannot be.
    pub fn create(
        cx: &Context,
        bundles: impl IntoIterator<Item = Bundle>,
        strategy: PlacementStrategy,
    ) -> PlacementGroup {
        PlacementGroup::build(cx, bundles, strategy, false)
    }

    /// Like [`PlacementGroup::create`], but the group outlives its job, until removed.
    pub fn create_detached(
        cx: &Context,
        bundles: impl IntoIterator<Item = Bundle>,
        strategy: PlacementStrategy,
    ) -> PlacementGroup {
        PlacementGroup::build(cx, bundles, strategy, true)
    }

    fn build(
        cx: &Context,
        bundles: impl IntoIterator<Item = Bundle>,
        strategy: PlacementStrategy,
        detached: bool,
    ) -> PlacementGroup {
        let mut invalid = None;
        let bundles: Vec<Resources> = bundles
            .into_iter()
            .enumerate()
            .map(|(index, bundle)| {
                if let Some(message) = bundle.invalid {
                    invalid.get_or_insert(format!("bundle {index}: {message}"));
                }
                bundle.resources
            })
            .collect();
        let job = cx.job().nested_in();
        let mut spec = GroupSpec { group: GroupId(chia_core::TaskId(0)), bundles, strategy, detached, job };
        if let Err(message) = spec.validate() {
            invalid.get_or_insert(message);
        }
        let kept = spec.bundles.clone();
        let created: ObjectRef<()> = send_request(cx, "placement group", Vec::new(), invalid, |task, _| {
            spec.group = GroupId(task);
            PeerToHead::CreateGroup(spec)
        });
        let id = GroupId(created.id());
        tracing::debug!(group = %id, %strategy, bundles = kept.len(), "placement group created");
        PlacementGroup { id, bundles: kept, strategy, cx: cx.clone(), created }
    }

    /// Its id (the head names it so in logs and errors).
    pub fn id(&self) -> GroupId {
        self.id
    }

    /// How its bundles are laid out.
    pub fn strategy(&self) -> PlacementStrategy {
        self.strategy
    }

    /// What each bundle reserves, in order.
    pub fn bundles(&self) -> &[Resources] {
        &self.bundles
    }

    /// Waits until every bundle is reserved and returns the node name of each, in bundle
    /// order. Fails with `Error::Task(TaskError::PlacementGroup { .. })` when the connected
    /// nodes could never hold it as its strategy asks (the reason names what is missing, e.g.
    /// a STRICT_SPREAD of 3 bundles with 2 nodes), when it is removed, or when the head
    /// refused it (`InvalidCall`: an empty bundle, too many bundles).
    pub async fn ready(&self) -> Result<Vec<String>, Error> {
        self.created.get().await?;
        let id = self.id;
        let answer: ObjectRef<Vec<String>> =
            send_request(&self.cx, "placement group", Vec::new(), None, |task, _| PeerToHead::GroupReady {
                task,
                group: id,
            });
        answer.get().await
    }

    /// Removes the group: what it reserved is free again, calls running in it are cancelled
    /// (with force) and those waiting fail. Removing a group that is gone is not an error.
    pub async fn remove(&self) -> Result<(), Error> {
        let id = self.id;
        let removed: ObjectRef<()> =
            send_request(&self.cx, "placement group", Vec::new(), None, |task, _| PeerToHead::RemoveGroup {
                task,
                group: id,
            });
        removed.get().await
    }

    /// The bundle `bundle` of this group (`None`: any bundle with room), or why there is none.
    pub(crate) fn bundle_ref(&self, bundle: Option<usize>) -> Result<BundleRef, String> {
        let index = match bundle {
            None => None,
            Some(b) if b < self.bundles.len() => u32::try_from(b).ok(),
            Some(b) => {
                return Err(format!("{} has no bundle {b} (it has {})", self.id, self.bundles.len()));
            }
        };
        Ok(BundleRef { group: self.id, bundle: index })
    }
}

impl std::fmt::Debug for PlacementGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacementGroup")
            .field("id", &self.id)
            .field("strategy", &self.strategy)
            .field("bundles", &self.bundles)
            .finish()
    }
}
