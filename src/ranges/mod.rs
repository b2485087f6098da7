//! Per-pod id ranges, the way the kubelet hands them out for
//! `hostUsers: false`, shared safely by every process on a node.
//!
//! The 32-bit id space is cut into blocks of `ids_per_pod` ids (65536 by
//! default, always a multiple of 65536). Ids below the first block stay with
//! the host. Each pod (a *key*: a pod UID, a container name) gets one block,
//! `uid = gid = [0 → first, count]`, written durably to a file of its own
//! before it is returned, so that several runtimes on one node — and a
//! runtime killed at any instant — can never hand one block out twice.
//!
//! ```no_run
//! use idmapped::ranges::{Allocator, Config};
//! use idmapped::UserNamespace;
//!
//! let mut ranges = Allocator::open("/var/lib/idmapped/ranges", &Config::new())?;
//! let pod = ranges.allocate("0b8f3c4e-pod-uid")?;
//! // uid_map and gid_map "0 FIRST COUNT": the pod's root is host id FIRST.
//! let userns = UserNamespace::from_mapping(pod.mapping())?;
//! # drop(userns);
//! // ... when the node's pods are known again after a restart:
//! ranges.reconcile(["0b8f3c4e-pod-uid"])?;
//! # Ok::<(), idmapped::Error>(())
//! ```
//!
//! # The mapping, column by column
//! [`Allocation::mapping`] is one [`Extent`] per map, `on_disk = 0`,
//! `seen = first`, `count = ids_per_pod` — the `uid_map` line
//! `0 FIRST COUNT` of the pod's user namespace. For a process, that line
//! means: id 0 inside the pod is host id `FIRST`. For a mount idmapped with
//! that namespace it means (see [`map`](crate::map)): **a file stored on
//! disk as 0 is seen as `FIRST`** — so a file the pod's root (host id
//! `FIRST`) creates through the mount is stored as 0, and the pod sees it as
//! its own root's. As a `--map-mount` value it is `b:0:FIRST:COUNT`
//! ([`Allocation::map_mount`]), and in the kubelet's and OCI's terms
//! `containerId = 0` (the on-disk id, for a mount), `hostId = FIRST`.
//!
//! # Rules
//! Checked by [`Config::layout`] (and so when an [`Allocator`] opens), each
//! failure a [`RuleViolation`] naming the value, all arithmetic in 64 bits:
//! - `ids_per_pod` is a non-zero multiple of 65536 and below 2^32;
//! - the pool's `first` is a multiple of `ids_per_pod` and at least
//!   `ids_per_pod` (ids below it stay with the host);
//! - the pool's `count` is a non-zero multiple of `ids_per_pod`;
//! - `first + count ≤ 2^32`. The kubelet computes this in 32 bits, so a
//!   `/etc/subuid` range that runs past 2^32 passes and its top blocks wrap to
//!   host ids 0, 65536, 131072: here the sum cannot wrap;
//! - the pool holds at least `max_pods` *usable* blocks (default 110).
//!
//! A block containing 4294967295 (`(uid_t)-1`) is never usable: the kernel
//! refuses a map whose range contains it (`0 4294901760 65536` gives
//! `EINVAL`), so a pod given the last block of the default pool would never
//! start. When the pool ends at 2^32, its last block is left out.
//!
//! # Which free block: a uniform random one
//! [`Allocator::allocate`] picks a block uniformly at random among the free
//! ones (as the kubelet does), not the first free one. First fit would hand
//! a just-released block to the very next pod, every time: whatever the old
//! pod left behind under its host ids — files on storage that is not
//! idmapped, SysV IPC objects, a process that outlived its pod's teardown —
//! would belong to the new pod at once. A random pick makes that reuse as
//! unlikely as the pool allows (1 in the number of free blocks: about 1 in
//! 65,000 with the default pool and 110 pods), and costs nothing measurable:
//! one pass over at most 65,535 blocks. Tests that need determinism assert
//! properties (distinct, aligned, inside the pool), not positions.
//!
//! # State on disk
//! See [`Allocator`]: one file per key in a directory, in the kubelet's
//! format, made durable before `allocate` returns, replayed and fully
//! validated on open.

#![forbid(unsafe_code)]

use std::fmt;

use crate::error::{Error, ErrorKind, Result};
use crate::map::{Extent, IdKind, Mapping};

mod json;
mod state;
mod subid;

pub use state::{Allocator, StateProblem};
pub use subid::{SubidLookup, SubidProblem, SubidSource, Subids};

/// Ids are handed out in multiples of this: the size of one classic
/// container's id range.
pub const BLOCK_UNIT: u64 = 65536;

/// The default `ids_per_pod`, as the kubelet's `idsPerPod`.
pub const DEFAULT_IDS_PER_POD: u64 = 65536;

/// The default `max_pods`, as the kubelet's `maxPods`.
pub const DEFAULT_MAX_PODS: u64 = 110;

/// The longest key: a DNS subdomain name, as a pod UID or name fits in.
pub const MAX_KEY_LEN: usize = 253;

/// 2^32: one past the largest 32-bit id.
const ID_SPACE: u64 = 1 << 32;

/// The ids pods are given blocks from: `count` ids starting at `first`.
///
/// Both are kept as given (64-bit, unchecked) so that [`Config::layout`] can
/// name a value that breaks a rule instead of silently truncating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pool {
    /// The first id of the pool.
    pub first: u64,
    /// How many ids the pool holds.
    pub count: u64,
}

impl Pool {
    /// An explicit pool of `count` ids starting at `first`.
    pub fn new(first: u64, count: u64) -> Pool {
        Pool { first, count }
    }

    /// The default pool for `ids_per_pod`: `[ids_per_pod, 2^32)`, every id
    /// above the host's first block (whose last block is never usable).
    pub fn default_for(ids_per_pod: u64) -> Pool {
        Pool {
            first: ids_per_pod,
            count: ID_SPACE.saturating_sub(ids_per_pod),
        }
    }

    /// `user`'s range from `/etc/subuid` and `/etc/subgid` (or the NSS subid
    /// plugins, through `getsubids` when it is installed); see [`Subids`].
    /// The two must be one identical range.
    pub fn from_subids(user: &str) -> Result<Pool> {
        Subids::lookup(user, &SubidLookup::system()).map(|s| s.pool)
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.first, self.count)
    }
}

/// A rule of the pool or block size that the settings break; each names the
/// values involved.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RuleViolation {
    /// `ids_per_pod` is zero or not a multiple of 65536.
    IdsPerPodNotMultiple {
        /// The value given.
        ids_per_pod: u64,
    },
    /// `ids_per_pod` is 2^32 or more.
    IdsPerPodTooLarge {
        /// The value given.
        ids_per_pod: u64,
    },
    /// The pool's first id is not a multiple of `ids_per_pod`.
    FirstNotAligned {
        /// The pool's first id.
        first: u64,
        /// The block size.
        ids_per_pod: u64,
    },
    /// The pool starts inside the host's ids, below `ids_per_pod`.
    FirstBelowIdsPerPod {
        /// The pool's first id.
        first: u64,
        /// The block size.
        ids_per_pod: u64,
    },
    /// The pool's size is zero or not a multiple of `ids_per_pod`.
    CountNotMultiple {
        /// The pool's size.
        count: u64,
        /// The block size.
        ids_per_pod: u64,
    },
    /// `first + count` (computed in 64 bits) is past 2^32: in 32 bits the
    /// pool's top blocks would wrap to host ids 0, 65536, ...
    PastIdSpace {
        /// The pool's first id.
        first: u64,
        /// The pool's size.
        count: u64,
    },
    /// The pool has fewer usable blocks than `max_pods`.
    TooFewBlocks {
        /// Blocks the pool can hand out (without one containing 4294967295).
        usable: u64,
        /// Pods the node must be able to run.
        max_pods: u64,
        /// The pool.
        pool: Pool,
        /// The block size.
        ids_per_pod: u64,
    },
    /// `max_pods` is zero.
    MaxPodsZero,
}

impl fmt::Display for RuleViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleViolation::IdsPerPodNotMultiple { ids_per_pod } => write!(
                f,
                "ids_per_pod {ids_per_pod} is not a positive multiple of {BLOCK_UNIT}"
            ),
            RuleViolation::IdsPerPodTooLarge { ids_per_pod } => write!(
                f,
                "ids_per_pod {ids_per_pod} is not below 2^32 ({ID_SPACE})"
            ),
            RuleViolation::FirstNotAligned { first, ids_per_pod } => write!(
                f,
                "pool first id {first} is not a multiple of ids_per_pod {ids_per_pod}"
            ),
            RuleViolation::FirstBelowIdsPerPod { first, ids_per_pod } => write!(
                f,
                "pool first id {first} is below ids_per_pod {ids_per_pod}: the first block stays with the host"
            ),
            RuleViolation::CountNotMultiple { count, ids_per_pod } => write!(
                f,
                "pool size {count} is not a positive multiple of ids_per_pod {ids_per_pod}"
            ),
            RuleViolation::PastIdSpace { first, count } => {
                let end = u128::from(*first) + u128::from(*count);
                write!(
                    f,
                    "pool {first}:{count} ends at {end}, past 2^32 ({ID_SPACE}); in 32-bit arithmetic its top blocks would wrap to host ids 0, 65536, ..."
                )
            }
            RuleViolation::TooFewBlocks {
                usable,
                max_pods,
                pool,
                ids_per_pod,
            } => write!(
                f,
                "pool {pool} holds {usable} usable blocks of {ids_per_pod} ids, fewer than max_pods {max_pods}"
            ),
            RuleViolation::MaxPodsZero => f.write_str("max_pods 0: must be at least 1"),
        }
    }
}

/// The settings an [`Allocator`] works with; [`Config::layout`] checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The pool; `None` means [`Pool::default_for`] `ids_per_pod`.
    pub pool: Option<Pool>,
    /// Ids per pod (a multiple of 65536).
    pub ids_per_pod: u64,
    /// Pods the pool must have room for.
    pub max_pods: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config::new()
    }
}

impl Config {
    /// The kubelet's defaults: 65536 ids per pod, 110 pods, the default pool.
    pub fn new() -> Config {
        Config {
            pool: None,
            ids_per_pod: DEFAULT_IDS_PER_POD,
            max_pods: DEFAULT_MAX_PODS,
        }
    }

    /// With `pool` instead of the default one.
    pub fn pool(mut self, pool: Pool) -> Config {
        self.pool = Some(pool);
        self
    }

    /// With `ids_per_pod` ids per block.
    pub fn ids_per_pod(mut self, ids_per_pod: u64) -> Config {
        self.ids_per_pod = ids_per_pod;
        self
    }

    /// Requiring room for `max_pods` pods.
    pub fn max_pods(mut self, max_pods: u64) -> Config {
        self.max_pods = max_pods;
        self
    }

    /// Checks every rule (see the [module docs](self)) and returns the
    /// blocks the pool is cut into. Fails with [`ErrorKind::RangeRule`].
    pub fn layout(&self) -> Result<Layout> {
        self.check()
            .map_err(|v| Error::new(ErrorKind::RangeRule(v)))
    }

    fn check(&self) -> std::result::Result<Layout, RuleViolation> {
        let l = self.ids_per_pod;
        if l == 0 || l % BLOCK_UNIT != 0 {
            return Err(RuleViolation::IdsPerPodNotMultiple { ids_per_pod: l });
        }
        if l >= ID_SPACE {
            return Err(RuleViolation::IdsPerPodTooLarge { ids_per_pod: l });
        }
        let pool = self.pool.unwrap_or_else(|| Pool::default_for(l));
        let Pool { first, count } = pool;
        if first % l != 0 {
            return Err(RuleViolation::FirstNotAligned {
                first,
                ids_per_pod: l,
            });
        }
        if first < l {
            return Err(RuleViolation::FirstBelowIdsPerPod {
                first,
                ids_per_pod: l,
            });
        }
        if count == 0 || count % l != 0 {
            return Err(RuleViolation::CountNotMultiple {
                count,
                ids_per_pod: l,
            });
        }
        // Both are u64; the sum is taken in u128 so that it cannot wrap
        // either, whatever the input.
        let end = u128::from(first) + u128::from(count);
        if end > u128::from(ID_SPACE) {
            return Err(RuleViolation::PastIdSpace { first, count });
        }
        if self.max_pods == 0 {
            return Err(RuleViolation::MaxPodsZero);
        }
        let blocks = count / l;
        // The only block that can contain 4294967295 is one ending at 2^32.
        let usable = if end == u128::from(ID_SPACE) {
            blocks - 1
        } else {
            blocks
        };
        if usable < self.max_pods {
            return Err(RuleViolation::TooFewBlocks {
                usable,
                max_pods: self.max_pods,
                pool,
                ids_per_pod: l,
            });
        }
        // first < 2^32 and l < 2^32 here (end <= 2^32, count >= l > 0).
        let (Ok(first32), Ok(l32)) = (u32::try_from(first), u32::try_from(l)) else {
            return Err(RuleViolation::PastIdSpace { first, count });
        };
        Ok(Layout {
            pool,
            first: first32,
            ids_per_pod: l32,
            blocks: usable,
            max_pods: self.max_pods,
        })
    }
}

/// Settings that passed every rule: the pool cut into usable blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pool: Pool,
    first: u32,
    ids_per_pod: u32,
    blocks: u64,
    max_pods: u64,
}

impl Layout {
    /// The pool.
    pub fn pool(&self) -> Pool {
        self.pool
    }

    /// Ids per block.
    pub fn ids_per_pod(&self) -> u32 {
        self.ids_per_pod
    }

    /// The blocks that can be handed out (a block containing 4294967295
    /// never is).
    pub fn usable_blocks(&self) -> u64 {
        self.blocks
    }

    /// The `max_pods` the pool was checked against.
    pub fn max_pods(&self) -> u64 {
        self.max_pods
    }

    /// The first id of usable block `index`, if there is such a block.
    pub fn block_first(&self, index: u64) -> Option<u32> {
        if index >= self.blocks {
            return None;
        }
        let first = u64::from(self.first) + index * u64::from(self.ids_per_pod);
        u32::try_from(first).ok()
    }

    /// The index of the usable block that starts at `first`, if any.
    pub fn block_index(&self, first: u64) -> Option<u64> {
        let offset = first.checked_sub(u64::from(self.first))?;
        let l = u64::from(self.ids_per_pod);
        (offset % l == 0 && offset / l < self.blocks).then_some(offset / l)
    }
}

/// Why a key was refused.
fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("it is empty")
    } else if key.len() > MAX_KEY_LEN {
        Some("it is longer than 253 characters")
    } else if key == "." || key == ".." {
        Some("\".\" and \"..\" are not keys")
    } else if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only A-Z a-z 0-9 . _ - are allowed")
    } else {
        None
    }
}

/// Checks a key: 1 to 253 characters of `[A-Za-z0-9._-]`, except `.` and
/// `..`. Keys name files in the state directory, so nothing else is allowed.
/// Fails with [`ErrorKind::InvalidKey`].
pub fn check_key(key: &str) -> Result<()> {
    match key_problem(key) {
        None => Ok(()),
        Some(reason) => Err(Error::new(ErrorKind::InvalidKey {
            key: key.to_owned(),
            reason,
        })),
    }
}

/// One key's block: `uid = gid = [0 → first, count]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    key: String,
    first: u32,
    count: u32,
    mapping: Mapping,
}

impl Allocation {
    /// Builds the allocation; `None` if the range is not a valid extent
    /// (one that would reach 4294967295).
    fn new(key: String, first: u32, count: u32) -> Option<Allocation> {
        let extent = Extent::new(0, first, count).ok()?;
        let mapping = Mapping::from_entries([(IdKind::Both, extent)]).ok()?;
        Some(Allocation {
            key,
            first,
            count,
            mapping,
        })
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The first host id of the block (what the pod's root runs as).
    pub fn first(&self) -> u32 {
        self.first
    }

    /// The number of ids (`ids_per_pod`).
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The mapping for the pod's user namespace and its idmapped volumes,
    /// ready for [`UserNamespace::from_mapping`](crate::UserNamespace::from_mapping):
    /// uid and gid maps `0 FIRST COUNT` (on-disk 0 seen as `FIRST`, see the
    /// [module docs](self)).
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// The `--map-mount` value of [`mapping`](Self::mapping): `b:0:FIRST:COUNT`.
    pub fn map_mount(&self) -> String {
        format!("b:0:{}:{}", self.first, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(c: Config) -> RuleViolation {
        match c.layout().unwrap_err().kind() {
            ErrorKind::RangeRule(v) => v.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn default_layout_leaves_out_the_last_block() {
        let l = Config::new().layout().unwrap();
        assert_eq!(l.usable_blocks(), 65534);
        assert_eq!(l.block_first(0), Some(65536));
        assert_eq!(l.block_first(65533), Some(4294836224));
        assert_eq!(l.block_first(65534), None);
        assert_eq!(l.block_index(4294901760), None);
        let l = Config::new().ids_per_pod(131072).layout().unwrap();
        assert_eq!(l.pool(), Pool::new(131072, (1 << 32) - 131072));
        assert_eq!(l.usable_blocks(), 32766);
    }

    #[test]
    fn rules_name_their_values() {
        let v = rule(Config::new().pool(Pool::new(327680, 4294836224)));
        assert_eq!(
            v,
            RuleViolation::PastIdSpace {
                first: 327680,
                count: 4294836224
            }
        );
        let s = v.to_string();
        assert!(
            s.contains("327680:4294836224") && s.contains("4295163904"),
            "{s}"
        );
        assert!(matches!(
            rule(Config::new().ids_per_pod(65537)),
            RuleViolation::IdsPerPodNotMultiple { ids_per_pod: 65537 }
        ));
        assert!(matches!(
            rule(Config::new().ids_per_pod(0)),
            RuleViolation::IdsPerPodNotMultiple { .. }
        ));
        assert!(matches!(
            rule(Config::new().ids_per_pod(1 << 32)),
            RuleViolation::IdsPerPodTooLarge { .. }
        ));
        assert!(matches!(
            rule(Config::new().pool(Pool::new(100000, 65536 * 200))),
            RuleViolation::FirstNotAligned { first: 100000, .. }
        ));
        assert!(matches!(
            rule(Config::new().pool(Pool::new(0, 65536 * 200))),
            RuleViolation::FirstBelowIdsPerPod { first: 0, .. }
        ));
        assert!(matches!(
            rule(Config::new().pool(Pool::new(65536, 65536 * 200 + 1))),
            RuleViolation::CountNotMultiple { .. }
        ));
        assert!(matches!(
            rule(Config::new().pool(Pool::new(65536, 65536 * 109))),
            RuleViolation::TooFewBlocks {
                usable: 109,
                max_pods: 110,
                ..
            }
        ));
        // The last block of a pool ending at 2^32 does not count.
        let top = (1u64 << 32) - 65536 * 110;
        assert!(matches!(
            rule(Config::new().pool(Pool::new(top, 65536 * 110))),
            RuleViolation::TooFewBlocks { usable: 109, .. }
        ));
        assert!(Config::new()
            .pool(Pool::new(top - 65536, 65536 * 111))
            .layout()
            .is_ok());
        assert!(matches!(
            rule(Config::new().pool(Pool::new(u64::MAX - 65535, 65536 * 200))),
            RuleViolation::FirstNotAligned { .. } | RuleViolation::PastIdSpace { .. }
        ));
        assert_eq!(rule(Config::new().max_pods(0)), RuleViolation::MaxPodsZero);
    }

    #[test]
    fn keys() {
        for good in ["a", "pod-1", "A.b_c-9", "...", &"k".repeat(253)] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "~tmp", "é", &"k".repeat(254)] {
            assert!(
                matches!(
                    check_key(bad).unwrap_err().kind(),
                    ErrorKind::InvalidKey { .. }
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn allocation_mapping_columns() {
        let a = Allocation::new("p".into(), 131072, 65536).unwrap();
        assert_eq!(a.map_mount(), "b:0:131072:65536");
        // On-disk 0 is seen as 131072 through a mount idmapped with it.
        assert_eq!(a.mapping().uids().seen(0), Some(131072));
        assert_eq!(a.mapping().gids().on_disk(131072 + 5), Some(5));
        assert_eq!(
            a.mapping(),
            &Mapping::parse_map_mount([a.map_mount().as_str()]).unwrap()
        );
        assert!(Allocation::new("p".into(), 4294901760, 65536).is_none());
    }
}
