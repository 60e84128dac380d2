//! Where each guest of a drain goes, what moving it costs, and the
//! shortest the drain could take.
//!
//! A guest's cost is the convergence model's prediction (the `converge`
//! crate, with livemig's adaptive controller steering) at a bandwidth: its
//! time and the bytes it sends. Guests are placed longest first (LPT) on
//! the compatible host whose inbound link is least loaded so far, which
//! spreads the bytes the way the schedule will need them.

use std::collections::BTreeMap;

use converge::controller::{AdaptiveSim, Policy};
use converge::model::{DirtyModel, Scenario};

/// Seconds a migration spends before and after copying memory (the
/// agents' probe and prepare, the destination QEMU's start, switchover and
/// confirm), as measured on the agents; the model's copy time comes on
/// top.
pub const SETUP_SECS: f64 = 0.6;

/// A drain's migration budget over sending the memory once.
pub const BUDGET_MARGIN: f64 = 1.3;

/// The shortest budget a drain gives a migration, seconds.
pub const MIN_BUDGET_SECS: f64 = 3.0;

/// A guest to move.
#[derive(Debug, Clone, PartialEq)]
pub struct Guest {
    /// The domain.
    pub name: String,
    /// Its RAM, bytes.
    pub memory_bytes: u64,
    /// What the first pass sends (the RAM in use), bytes.
    pub first_pass_bytes: f64,
    /// How it dirties memory (an idle guest when it was not measured).
    pub model: DirtyModel,
    /// Virtual size of its disks not on shared storage, which go with it,
    /// bytes (0 when it has none, or was not measured).
    pub copied_disk_bytes: u64,
}

impl Guest {
    /// A guest that writes nothing while it moves.
    pub fn idle(name: &str, memory_bytes: u64) -> Guest {
        Guest {
            name: name.to_string(),
            memory_bytes,
            first_pass_bytes: memory_bytes as f64,
            model: DirtyModel {
                rate: 0.0,
                working_set: 0.0,
                rate_is_lower_bound: false,
            },
            copied_disk_bytes: 0,
        }
    }

    /// Its migration at `bandwidth` bytes/s with the adaptive controller
    /// and no time budget: it throttles only as much as converging needs.
    pub fn cost(&self, bandwidth: f64) -> Cost {
        self.cost_within(bandwidth, bandwidth, None)
    }

    /// The time budget a drain gives its migration at `bandwidth`: a
    /// margin over sending its memory once. Within it the adaptive
    /// controller trades a little guest time for the link time that
    /// re-sending a hot working set over and over would take from every
    /// guest after it.
    pub fn budget(&self, bandwidth: f64) -> f64 {
        (self.first_pass_bytes / bandwidth.max(1.0) * BUDGET_MARGIN).max(MIN_BUDGET_SECS)
    }

    /// Its migration at `bandwidth` bytes/s (a share of a `path` of more,
    /// whose whole speed QEMU's stop-and-copy gets once it lifts the cap)
    /// with the adaptive controller, to complete within `budget` seconds if
    /// given.
    pub fn cost_within(&self, bandwidth: f64, path: f64, budget: Option<f64>) -> Cost {
        let policy = Policy {
            max_throttle: 0.99,
            downtime: DOWNTIME_SECS,
            max_downtime: 1.0,
            budget,
            allow_postcopy: false,
            postcopy_bandwidth: None,
        };
        let scenario = Scenario {
            first_pass_whole: true,
            switchover_bandwidth: Some(path),
            first_pass_bytes: self.first_pass_bytes,
            model: self.model,
            bandwidth: bandwidth.max(1.0),
            downtime: policy.downtime,
            horizon: converge::controller::DEFAULT_HORIZON_SECS,
        };
        let p = AdaptiveSim::run(&scenario, policy, Some(self.model));
        Cost {
            secs: p.total_secs,
            bytes: p.transferred,
            work_lost_secs: p.work_lost_secs,
            converges: p.converges,
        }
    }

    /// The bandwidth it can use to good effect on a path of `link`
    /// bytes/s, what admission reserves for it and what the link is split
    /// by. One that barely writes sends its memory once at any speed, so it
    /// makes do with a tenth of the link (it is never starved, and gets
    /// more when others leave room). A writer sends less the faster it
    /// goes, so it wants the whole path, unless it converges unthrottled on
    /// [`SMALL_NEED`] of it or less: on [`RATE_MARGIN`] times its dirty
    /// rate or on its working set over [`DOWNTIME_FIT`] of the downtime
    /// (the whole set then goes in the stop-and-copy, however fast it is
    /// rewritten), whichever is less; on the latter alone when the rate is
    /// only a lower bound.
    pub fn need(&self, link: f64) -> f64 {
        let model = &self.model;
        if model.rate <= 0.05 * link || model.working_set <= 0.05 * link {
            return MIN_NEED * link;
        }
        let unthrottled = self.converges_on();
        if unthrottled <= SMALL_NEED * link {
            unthrottled.max(MIN_NEED * link)
        } else {
            link
        }
    }

    /// The bandwidth on which it converges unthrottled, bytes/s: [`RATE_MARGIN`]
    /// times its dirty rate or its working set over [`DOWNTIME_FIT`] of the
    /// downtime, whichever is less; the latter alone when the rate is only
    /// a lower bound (it says nothing of a bandwidth that outruns it).
    pub fn converges_on(&self) -> f64 {
        let model = &self.model;
        let fits_downtime = model.working_set / (DOWNTIME_FIT * DOWNTIME_SECS);
        if model.rate_is_lower_bound {
            fits_downtime
        } else {
            fits_downtime.min(RATE_MARGIN * model.rate)
        }
    }

    /// It is small: it needs at most [`SMALL_NEED`] of the path, so the link
    /// split gives it at least its need and nothing hurries it.
    pub fn is_small(&self, link: f64) -> bool {
        is_small_need(self.need(link), link)
    }
}

/// The least part of a link a migration is given.
pub const MIN_NEED: f64 = 0.1;

/// How many times its measured dirty rate a small writer needs. Twice
/// (each pass re-sends at most half the one before) was no margin in the
/// drain benchmark: a guest's rate grows as the host empties (six busy
/// TCG guests on two cores at the survey, two at the end), and a light
/// guest measured at 5 MiB/s dirtied 9 MiB/s in its job and was throttled
/// to 99 % on its 10 MiB/s.
pub const RATE_MARGIN: f64 = 3.0;

/// The most a writer needs short of the whole link: one that converges
/// unthrottled on this part of it or less is small ([`Guest::is_small`]).
/// Small migrations may also take this part of a link beside ones that
/// hold it (`schedule::admit`): they use what a throttled writer leaves,
/// and end long before it, instead of queueing behind it.
pub const SMALL_NEED: f64 = 0.3;

/// A migration needing `need` bytes/s on a path of `link` is small
/// ([`Guest::is_small`]).
pub fn is_small_need(need: f64, link: f64) -> bool {
    need <= SMALL_NEED * link
}

/// The downtime a drain's migrations aim for, seconds.
pub const DOWNTIME_SECS: f64 = 0.3;

/// The part of the downtime a small guest's working set is sized to: the
/// rest is for what it dirties before its vCPUs stop, and for QEMU's
/// reading of the bandwidth, which is never exact. (Sized to the whole
/// downtime, a guest rewriting 6 MiB got 20 MiB/s, exactly the 6 MiB QEMU
/// switches over at.)
pub const DOWNTIME_FIT: f64 = 0.8;

/// A migration predicted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    /// Seconds copying memory (setup comes on top).
    pub secs: f64,
    /// Bytes sent.
    pub bytes: f64,
    /// Seconds of full-speed guest time lost to throttling and downtime.
    pub work_lost_secs: f64,
    /// It converges.
    pub converges: bool,
}

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// Its name in the cluster.
    pub name: String,
    /// Its migration link, bytes/s each way.
    pub link: f64,
    /// RAM free, bytes.
    pub ram_free_bytes: u64,
    /// Space free for copied disks, bytes (`None`: not reported, not
    /// checked).
    pub disk_free_bytes: Option<u64>,
    /// Its QEMU version (`7.2.x`).
    pub qemu_version: String,
    /// Its CPU model.
    pub cpu_model: String,
    /// Cordoned, and why.
    pub cordoned: Option<String>,
}

impl Host {
    /// RAM it can give guests, bytes: what is free less what it keeps for
    /// itself.
    pub fn room(&self) -> u64 {
        self.ram_free_bytes.saturating_sub(RAM_RESERVE)
    }
}

/// Where the guests go.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Placement {
    /// Guest name to host name.
    pub destination: BTreeMap<String, String>,
    /// Guests no host can take, with why.
    pub unplaceable: BTreeMap<String, String>,
}

/// RAM a host keeps for itself besides its guests', bytes.
const RAM_RESERVE: u64 = 64 << 20;

/// `major.minor` of a QEMU version, comparable.
fn qemu_release(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    let major = parts.next()?.trim().parse().ok()?;
    let minor = parts.next()?.trim().parse().ok()?;
    Some((major, minor))
}

/// Why `host` cannot take guests from `source` at all, if it cannot.
pub fn incompatible(source: &Host, host: &Host, to: &[String]) -> Option<String> {
    if host.name == source.name {
        return Some("it is the host being drained".into());
    }
    if !to.is_empty() && !to.contains(&host.name) {
        return Some("not named by --to".into());
    }
    if let Some(reason) = &host.cordoned {
        return Some(format!("cordoned ({reason})"));
    }
    match (
        qemu_release(&source.qemu_version),
        qemu_release(&host.qemu_version),
    ) {
        (Some(from), Some(to)) if to >= from => {}
        _ => {
            return Some(format!(
                "QEMU {} cannot take a guest from QEMU {}",
                host.qemu_version, source.qemu_version
            ))
        }
    }
    if host.cpu_model != source.cpu_model {
        return Some(format!(
            "CPU {:?}, not the source's {:?}",
            host.cpu_model, source.cpu_model
        ));
    }
    None
}

/// Seconds of inbound work and guests placed so far, by host: shared by
/// the placements of several drained hosts so that they spread together.
pub type Load = BTreeMap<String, (f64, usize)>;

/// Places `guests` from `source` on `hosts` (only those in `to`, if any):
/// longest migration first, each on the compatible host with room whose
/// inbound link has the fewest seconds of work so far.
pub fn place(guests: &[Guest], source: &Host, hosts: &[Host], to: &[String]) -> Placement {
    place_with(guests, source, hosts, to, &mut Load::new())
}

/// As [`place`], counting (and adding to) the inbound work `load` holds.
pub fn place_with(
    guests: &[Guest],
    source: &Host,
    hosts: &[Host],
    to: &[String],
    load: &mut Load,
) -> Placement {
    let mut placement = Placement::default();
    let mut why_not: Vec<(&Host, Option<String>)> = hosts
        .iter()
        .map(|h| (h, incompatible(source, h, to)))
        .collect();
    why_not.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let mut free: BTreeMap<&str, u64> = hosts.iter().map(|h| (h.name.as_str(), h.room())).collect();
    let mut disk_free: BTreeMap<&str, Option<u64>> = hosts
        .iter()
        .map(|h| (h.name.as_str(), h.disk_free_bytes))
        .collect();
    for guest in by_cost(guests, source.link) {
        // What it sends, once: the same whichever host takes it.
        let bytes = guest.cost(source.link).bytes;
        let mut best: Option<(&Host, f64, usize)> = None;
        let mut reasons = Vec::new();
        for (host, incompatible) in &why_not {
            if host.name == source.name {
                continue;
            }
            if let Some(reason) = incompatible {
                reasons.push(format!("{}: {reason}", host.name));
                continue;
            }
            if free[host.name.as_str()] < guest.memory_bytes {
                reasons.push(format!(
                    "{}: {} MiB free, the guest needs {} MiB",
                    host.name,
                    free[host.name.as_str()] >> 20,
                    guest.memory_bytes >> 20
                ));
                continue;
            }
            if let Some(disk) = disk_free[host.name.as_str()] {
                if disk < guest.copied_disk_bytes {
                    reasons.push(format!(
                        "{}: {} MiB free for copied disks, the guest's local disks need {} MiB",
                        host.name,
                        disk >> 20,
                        guest.copied_disk_bytes.div_ceil(1 << 20)
                    ));
                    continue;
                }
            }
            let (secs, count) = load.get(host.name.as_str()).copied().unwrap_or_default();
            let after = secs + bytes / host.link;
            if best.is_none_or(|(_, s, c)| (after, count) < (s, c)) {
                best = Some((host, after, count));
            }
        }
        match best {
            Some((host, after, count)) => {
                *free.get_mut(host.name.as_str()).expect("listed") -= guest.memory_bytes;
                if let Some(Some(disk)) = disk_free.get_mut(host.name.as_str()) {
                    *disk -= guest.copied_disk_bytes;
                }
                load.insert(host.name.clone(), (after, count + 1));
                placement
                    .destination
                    .insert(guest.name.clone(), host.name.clone());
            }
            None => {
                let reason = if reasons.is_empty() {
                    "no other host is in the cluster".to_string()
                } else {
                    reasons.join("; ")
                };
                placement.unplaceable.insert(guest.name.clone(), reason);
            }
        }
    }
    placement
}

/// `guests` longest migration at `link` first (ties by name).
pub fn by_cost(guests: &[Guest], link: f64) -> Vec<&Guest> {
    let mut sorted: Vec<(&Guest, f64)> = guests.iter().map(|g| (g, g.cost(link).secs)).collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.name.cmp(&b.0.name)));
    sorted.into_iter().map(|(g, _)| g).collect()
}

/// The shortest a drain could take: nothing crosses before the first
/// migration is set up, and then every link must carry at least the memory
/// in use of each guest that crosses it (a guest that wrote nothing while
/// it moved, or was stopped, sends no more).
pub fn lower_bound(guests: &[Guest], source: &Host, hosts: &[Host], placement: &Placement) -> f64 {
    let links: BTreeMap<&str, f64> = hosts.iter().map(|h| (h.name.as_str(), h.link)).collect();
    let mut outbound = 0.0;
    let mut inbound: BTreeMap<&str, f64> = BTreeMap::new();
    let mut longest: f64 = 0.0;
    for guest in guests {
        let Some(to) = placement.destination.get(&guest.name) else {
            continue;
        };
        let link = links.get(to.as_str()).copied().unwrap_or(source.link);
        outbound += guest.first_pass_bytes;
        *inbound.entry(to).or_default() += guest.first_pass_bytes;
        longest = longest.max(guest.first_pass_bytes / link.min(source.link));
    }
    let mut bound = longest.max(outbound / source.link);
    for (host, bytes) in inbound {
        bound = bound.max(bytes / links[host]);
    }
    if placement.destination.is_empty() {
        return 0.0;
    }
    SETUP_SECS + bound
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MIB: f64 = 1048576.0;

    pub(crate) fn host(name: &str, link_mib: f64, free_mib: u64) -> Host {
        Host {
            name: name.into(),
            link: link_mib * MIB,
            ram_free_bytes: free_mib << 20,
            disk_free_bytes: None,
            qemu_version: "7.2.19".into(),
            cpu_model: "cpu".into(),
            cordoned: None,
        }
    }

    pub(crate) fn writer(name: &str, mib: u64, rate_mib: f64, ws_mib: f64) -> Guest {
        Guest {
            name: name.into(),
            memory_bytes: mib << 20,
            first_pass_bytes: (mib << 20) as f64,
            model: DirtyModel {
                rate: rate_mib * MIB,
                working_set: ws_mib * MIB,
                rate_is_lower_bound: false,
            },
            copied_disk_bytes: 0,
        }
    }

    #[test]
    fn a_busier_guest_costs_more_and_more_bandwidth_costs_less() {
        let idle = Guest::idle("i", 256 << 20);
        let hot = writer("h", 256, 80.0, 64.0);
        assert!(hot.cost(100.0 * MIB).secs > idle.cost(100.0 * MIB).secs);
        assert!(hot.cost(50.0 * MIB).secs > hot.cost(100.0 * MIB).secs);
        assert!(hot.cost(100.0 * MIB).bytes > idle.cost(100.0 * MIB).bytes);
        // The idle one sends its RAM once.
        let idle_cost = idle.cost(100.0 * MIB);
        assert!((idle_cost.bytes - (256 << 20) as f64).abs() < MIB);
        assert!((idle_cost.secs - 2.56).abs() < 0.1, "{idle_cost:?}");
    }

    #[test]
    fn a_writer_needs_what_converges_it_unthrottled_or_the_whole_link() {
        let link = 100.0 * MIB;
        let need = |g: &Guest| g.need(link) / MIB;
        // Its working set fits the downtime (with room) at 25 MiB/s.
        let light = writer("l", 128, 15.0, 6.0);
        assert!((need(&light) - 6.0 / (DOWNTIME_FIT * DOWNTIME_SECS)).abs() < 0.01);
        assert!(light.is_small(link));
        // Its rate with a margin is less.
        let slow = writer("s", 128, 8.0, 16.0);
        assert!((need(&slow) - 8.0 * RATE_MARGIN).abs() < 0.01);
        // ... unless the rate is only a lower bound: then only a working
        // set that fits the downtime counts.
        let mut bounded = slow.clone();
        bounded.model.rate_is_lower_bound = true;
        assert_eq!(need(&bounded), 100.0);
        assert!(!bounded.is_small(link));
        let mut bounded_light = light.clone();
        bounded_light.model.rate = 6.0 * MIB;
        bounded_light.model.rate_is_lower_bound = true;
        assert_eq!(need(&bounded_light), need(&light));
        // Writers beyond three tenths of the link want all of it; a guest that
        // barely writes, a tenth.
        assert_eq!(need(&writer("h", 192, 40.0, 64.0)), 100.0);
        assert_eq!(need(&writer("q", 128, 0.5, 1.0)), 10.0);
        assert_eq!(need(&Guest::idle("i", 128 << 20)), 10.0);
    }

    #[test]
    fn guests_spread_over_compatible_hosts_with_room() {
        let a = host("a", 100.0, 4096);
        let mut old = host("old", 100.0, 4096);
        old.qemu_version = "6.2.0".into();
        let mut other_cpu = host("other", 100.0, 4096);
        other_cpu.cpu_model = "different".into();
        let mut cordoned = host("cordoned", 100.0, 4096);
        cordoned.cordoned = Some("maintenance".into());
        let hosts = [
            a.clone(),
            host("b", 100.0, 4096),
            host("c", 100.0, 4096),
            old,
            other_cpu,
            cordoned,
        ];
        let guests: Vec<Guest> = (0..4)
            .map(|i| writer(&format!("g{i}"), 256, 10.0 * i as f64, 32.0))
            .collect();
        let p = place(&guests, &a, &hosts, &[]);
        assert!(p.unplaceable.is_empty(), "{p:?}");
        let on = |h: &str| p.destination.values().filter(|d| *d == h).count();
        assert_eq!((on("b"), on("c")), (2, 2), "{p:?}");

        // --to limits the choice.
        let p = place(&guests, &a, &hosts, &["c".into()]);
        assert_eq!(on_all(&p, "c"), 4);

        // No room anywhere: each guest says why, host by host.
        let small = [a.clone(), host("b", 100.0, 400)];
        let p = place(&guests, &a, &small, &[]);
        assert_eq!(p.destination.len(), 1, "{p:?}");
        let reason = &p.unplaceable["g0"];
        assert!(
            reason.contains("b: 80 MiB free, the guest needs 256 MiB"),
            "{reason}"
        );
        let p = place(&guests, &a, &hosts[..1], &[]);
        assert!(p.unplaceable["g1"].contains("no other host"), "{p:?}");
        let p = place(&guests, &a, &hosts[3..], &[]);
        let reason = &p.unplaceable["g2"];
        assert!(reason.contains("QEMU 6.2.0"), "{reason}");
        assert!(reason.contains("CPU \"different\""), "{reason}");
        assert!(reason.contains("cordoned (maintenance)"), "{reason}");
    }

    #[test]
    fn local_disks_go_only_where_there_is_space_for_them() {
        let a = host("a", 100.0, 4096);
        let mut roomy = host("b", 100.0, 4096);
        roomy.disk_free_bytes = Some(3 << 30);
        let mut full = host("c", 100.0, 4096);
        full.disk_free_bytes = Some(1 << 30);
        let with_disk = |name: &str| {
            let mut g = writer(name, 256, 0.0, 0.0);
            g.copied_disk_bytes = 2 << 30;
            g
        };
        let guests = [with_disk("d1"), with_disk("d2")];
        let hosts = [a.clone(), roomy, full];
        let p = place(&guests, &a, &hosts, &[]);
        // The first takes b's space; c never had enough; the second waits
        // on neither RAM nor spread but on disk, and says so for each.
        assert_eq!(p.destination.len(), 1, "{p:?}");
        assert_eq!(p.destination.values().next().unwrap(), "b");
        let (_, reason) = p.unplaceable.iter().next().unwrap();
        assert!(
            reason.contains(
                "b: 1024 MiB free for copied disks, the guest's local disks need 2048 MiB"
            ),
            "{reason}"
        );
        assert!(
            reason.contains("c: 1024 MiB free for copied disks"),
            "{reason}"
        );
        // A guest whose disks are all shared, or a host that does not
        // report its space, is not held back.
        let shared = [writer("s", 256, 0.0, 0.0), with_disk("d3")];
        let p = place(&shared, &a, &[a.clone(), host("e", 100.0, 4096)], &[]);
        assert!(p.unplaceable.is_empty(), "{p:?}");
    }

    fn on_all(p: &Placement, h: &str) -> usize {
        p.destination.values().filter(|d| *d == h).count()
    }

    #[test]
    fn the_lower_bound_is_the_busiest_link_or_the_longest_guest() {
        let a = host("a", 100.0, 0);
        let hosts = [a.clone(), host("b", 100.0, 4096), host("c", 50.0, 4096)];
        let guests: Vec<Guest> = (0..4)
            .map(|i| Guest::idle(&format!("g{i}"), 200 << 20))
            .collect();
        let mut p = Placement::default();
        for (i, g) in guests.iter().enumerate() {
            let to = if i == 0 { "c" } else { "b" };
            p.destination.insert(g.name.clone(), to.into());
        }
        // 800 MiB leave a at 100 MiB/s: 8 s; c's 200 MiB at 50: 4 s.
        let bound = lower_bound(&guests, &a, &hosts, &p);
        assert!((bound - 8.0 - SETUP_SECS).abs() < 0.01, "{bound}");
        // One guest: its own time.
        let one = [Guest::idle("g0", 200 << 20)];
        let bound = lower_bound(&one, &a, &hosts, &p);
        assert!((bound - 4.0 - SETUP_SECS).abs() < 0.01, "{bound}");
        // A writer sends more than its memory, but need not.
        let hot = [writer("g0", 200, 80.0, 64.0)];
        assert_eq!(lower_bound(&hot, &a, &hosts, &p), bound);
    }
}
