//! Which migrations run at once, and how the links are shared among them.
//!
//! Every host has a migration link, the same each way. A migration uses
//! its source's outbound and its destination's inbound side. Caps (per
//! host each way, per cluster) are limits a schedule never exceeds, not
//! the schedule itself.
//!
//! livemig's rule ([`Policy::Livemig`]): guests allowed to go to
//! post-copy are taken longest first, the others quickest first
//! ([`by_order`]); one is admitted when both its links have the bandwidth
//! it needs to converge ([`crate::plan::Guest::need`]) beside what the
//! running ones need, counting a running one only until it is within its
//! setup time of the end, so that the next one's setup overlaps its tail;
//! a small one ([`crate::plan::Guest::is_small`]) is also admitted beside
//! migrations that hold its links, within [`crate::plan::SMALL_NEED`] of
//! each link for all such, rather than queueing behind a writer that
//! cannot use the whole link while it is throttled, when it ends before
//! the longest of them (or that one has run past its prediction, and may
//! run any time yet). A migration whose policy allows post-copy converges
//! on any share, so it goes as soon as the caps let it, beside whatever
//! runs. The links are shared in proportion to need (a small one, and the
//! writer nearest its end on each source's link, get at least what they
//! converge unthrottled on; one in post-copy, whose guest waits on the
//! link, comes first), so a hot writer is not starved into
//! throttling by idle guests, one about to end is not by long ones, and no
//! guest is starved at all; they are split again as migrations start and
//! end. A share is a cap: a migration that sends less than its share
//! leaves the rest idle.
//!
//! The fixed policies operators use today, for comparison: one at a time
//! per host (Nova's default), two per host (KubeVirt's), and everything at
//! once; their migrations share each link evenly, as competing TCP streams
//! do.
//!
//! [`simulate`] runs a schedule over the convergence model in virtual
//! time: the drain's prediction, and the fleet-scale benchmark.

use std::collections::HashMap;

use crate::plan::{is_small_need, Guest, MIN_NEED, SETUP_SECS, SMALL_NEED};

/// How migrations are admitted and share the links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// One at a time per host (Nova's `max_concurrent_live_migrations=1`).
    Sequential,
    /// At most this many per host each way (KubeVirt's 2 per node).
    Fixed(u32),
    /// Everything at once.
    All,
    /// livemig's: by cost, by need, with the links re-split as jobs come
    /// and go.
    Livemig,
}

impl Policy {
    /// The name benchmarks report.
    pub fn name(self) -> String {
        match self {
            Policy::Sequential => "sequential".into(),
            Policy::Fixed(n) => format!("fixed-{n}"),
            Policy::All => "all".into(),
            Policy::Livemig => "livemig".into(),
        }
    }
}

/// Limits a schedule never exceeds (`None`: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// Migrations leaving one host at once.
    pub outbound: Option<u32>,
    /// Migrations arriving at one host at once.
    pub inbound: Option<u32>,
    /// Migrations in the cluster at once.
    pub cluster: Option<u32>,
}

impl From<Caps> for cluster::Limits {
    fn from(caps: Caps) -> Self {
        cluster::Limits {
            outbound: caps.outbound,
            inbound: caps.inbound,
            cluster: caps.cluster,
        }
    }
}

impl From<cluster::Limits> for Caps {
    fn from(limits: cluster::Limits) -> Self {
        Caps {
            outbound: limits.outbound,
            inbound: limits.inbound,
            cluster: limits.cluster,
        }
    }
}

/// A migration that runs, as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Running {
    /// Source host index.
    pub from: usize,
    /// Destination host index.
    pub to: usize,
    /// Bandwidth it needs, bytes/s.
    pub need: f64,
    /// Seconds it is predicted to go on.
    pub remaining_secs: f64,
    /// It has run past its predicted time, so `remaining_secs` is read
    /// from the bytes it has left alone, which say nothing of the passes
    /// it may still need: a writer throttled or waiting for post-copy reads
    /// nearly done for seconds. A small migration may go beside it
    /// without having to end before it.
    pub overran: bool,
    /// It is in post-copy: it comes first on its links ([`shares`]), and
    /// is never the writer nearest its end. (Four times its need, tried
    /// when a pre-copy writer beside it could only be throttled, had that
    /// writer throttled to 99 % on a fifth of the link; such a writer now
    /// goes to post-copy itself where post-copy is allowed.)
    pub postcopy_active: bool,
    /// The bandwidth on which it converges unthrottled
    /// ([`crate::plan::Guest::converges_on`]), if that is known: the one
    /// nearest its end on its source's link gets it ([`shares`]).
    pub converges_on: Option<f64>,
}

/// A migration that waits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Waiting {
    /// Source host index.
    pub from: usize,
    /// Destination host index.
    pub to: usize,
    /// Bandwidth it needs, bytes/s.
    pub need: f64,
    /// Seconds it is predicted to copy, admitted as it needs.
    pub secs: f64,
    /// Seconds it would copy as a small migration beside others (on its
    /// need, which [`shares`] gives it at least), if it may go beside them
    /// at all ([`crate::plan::Guest::is_small`]).
    pub fill_in_secs: Option<f64>,
    /// Its policy allows post-copy: it converges at any share of the
    /// links, so it is admitted without waiting for room (the caps still
    /// bind), and the split decides how fast it goes.
    pub postcopy: bool,
}

fn capped(count: usize, cap: Option<u32>) -> bool {
    cap.is_some_and(|c| count >= c as usize)
}

/// Which of `waiting` (in the order given) start now beside `running`;
/// indices into `waiting`, in admission order.
pub fn admit(
    policy: Policy,
    caps: Caps,
    links: &[f64],
    running: &[Running],
    waiting: &[Waiting],
) -> Vec<usize> {
    let hosts = links.len();
    let mut out = vec![0usize; hosts];
    let mut inb = vec![0usize; hosts];
    // Bandwidth promised per host, each way.
    let mut out_bw = vec![0.0f64; hosts];
    let mut in_bw = vec![0.0f64; hosts];
    // ... of which to small migrations, and the longest time a migration
    // holds each side.
    let mut out_fill = vec![0.0f64; hosts];
    let mut in_fill = vec![0.0f64; hosts];
    let mut out_held = vec![0.0f64; hosts];
    let mut in_held = vec![0.0f64; hosts];
    let small = |from: usize, to: usize, need: f64| is_small_need(need, links[from].min(links[to]));
    for r in running {
        out[r.from] += 1;
        inb[r.to] += 1;
        if r.remaining_secs > SETUP_SECS + 1e-6 {
            out_bw[r.from] += r.need;
            in_bw[r.to] += r.need;
            if small(r.from, r.to, r.need) {
                out_fill[r.from] += r.need;
                in_fill[r.to] += r.need;
            }
            let held = if r.overran {
                f64::INFINITY
            } else {
                r.remaining_secs
            };
            out_held[r.from] = out_held[r.from].max(held);
            in_held[r.to] = in_held[r.to].max(held);
        }
    }
    let mut total = running.len();
    let per_host = match policy {
        Policy::Sequential => Some(1),
        Policy::Fixed(n) => Some(n),
        Policy::All | Policy::Livemig => None,
    };
    let mut admitted = Vec::new();
    for (i, w) in waiting.iter().enumerate() {
        if capped(total, caps.cluster)
            || capped(out[w.from], caps.outbound)
            || capped(inb[w.to], caps.inbound)
            || per_host.is_some_and(|n| capped(out[w.from], Some(n)) || capped(inb[w.to], Some(n)))
        {
            continue;
        }
        let fill_in = w.fill_in_secs.is_some() && small(w.from, w.to, w.need);
        if policy == Policy::Livemig {
            let idle = out_bw[w.from] == 0.0 && in_bw[w.to] == 0.0;
            // Each side has room for its need; or the migration is small,
            // the other small ones leave it room, and it ends (setup
            // included) while the longest one there still holds the side:
            // the link carries its bytes in what that one leaves, and the
            // drain does not wait for it after.
            let side = |bw: f64, fill: f64, held: f64, link: f64| {
                bw + w.need <= link * 1.0001
                    || (fill_in
                        && fill + w.need <= SMALL_NEED * link * 1.0001
                        && SETUP_SECS + w.fill_in_secs.unwrap_or(f64::INFINITY) <= held)
            };
            let fits = side(
                out_bw[w.from],
                out_fill[w.from],
                out_held[w.from],
                links[w.from],
            ) && side(in_bw[w.to], in_fill[w.to], in_held[w.to], links[w.to]);
            // One that may go to post-copy converges on any share; what
            // its need buys is time, and on a drain whose long migrations
            // spend seconds on decisions (the pre-flight, the probe, the
            // switch to post-copy) rather than on bytes, waiting for room
            // costs more time than sharing the link does.
            if !idle && !fits && !w.postcopy {
                continue;
            }
        }
        out[w.from] += 1;
        inb[w.to] += 1;
        out_bw[w.from] += w.need;
        in_bw[w.to] += w.need;
        if fill_in {
            out_fill[w.from] += w.need;
            in_fill[w.to] += w.need;
        }
        let secs = SETUP_SECS
            + match w.fill_in_secs {
                Some(secs) if fill_in => secs,
                _ => w.secs,
            };
        out_held[w.from] = out_held[w.from].max(secs);
        in_held[w.to] = in_held[w.to].max(secs);
        total += 1;
        admitted.push(i);
    }
    admitted
}

/// Each running migration's bandwidth, bytes/s, in `running`'s order.
/// Every link is shared max-min fairly; livemig weighs each migration by
/// what it needs (a writer's share grows with its need, an idle guest's
/// is small but never nothing) and gives a small one
/// ([`crate::plan::Guest::is_small`]) at least its need, which is what
/// makes it converge unthrottled, and the writer nearest its end on each
/// source's link what it converges unthrottled on (both scaled down only
/// where together they ask more than a link has); the fixed policies
/// weigh them alike, as competing TCP streams share a link.
pub fn shares(policy: Policy, links: &[f64], running: &[Running]) -> Vec<f64> {
    let weight: Vec<f64> = running
        .iter()
        .map(|r| match policy {
            Policy::Livemig => r.need.max(1.0),
            _ => 1.0,
        })
        .collect();
    let hosts = links.len();
    let mut capacity: Vec<f64> = links.iter().chain(links.iter()).copied().collect();
    let mut fixed: Vec<Option<f64>> = vec![None; running.len()];
    if policy != Policy::Livemig {
        return fill(&capacity, &weight, running, &fixed);
    }
    let floors = floors(links, running);
    // What the floors ask of each link, to scale them down where they ask
    // more than it has.
    let mut asked = vec![0.0f64; 2 * hosts];
    for (r, floor) in running.iter().zip(&floors) {
        if let Some(floor) = floor {
            asked[r.from] += floor;
            asked[hosts + r.to] += floor;
        }
    }
    // One that the weighed split leaves short of its floor gets it and
    // leaves the split; the others are split again, until none is short
    // (each round fixes at least one, so at most one per migration).
    loop {
        let share = fill(&capacity, &weight, running, &fixed);
        let mut short = false;
        for (i, r) in running.iter().enumerate() {
            let Some(wanted) = floors[i] else {
                continue;
            };
            if fixed[i].is_some() {
                continue;
            }
            let scale = [r.from, hosts + r.to]
                .iter()
                .map(|&l| (links[l % hosts] / asked[l].max(1e-9)).min(1.0))
                .fold(1.0, f64::min);
            let floor = wanted * scale;
            if share[i] < floor - 1e-9 {
                fixed[i] = Some(floor);
                capacity[r.from] -= floor;
                capacity[hosts + r.to] -= floor;
                short = true;
            }
        }
        if !short {
            return share;
        }
    }
}

/// The least each running migration is given in livemig's split, if
/// anything: a small one its need, which makes it converge unthrottled;
/// on each source's link the writer nearest its end (not in post-copy,
/// not past its prediction) what it converges unthrottled on, if the link
/// has that (it ends in moments and the link is then the others'; weighed
/// alike beside two long migrations admitted after it, a light guest
/// rewriting a 16 MiB working set got a third of the link, half what it
/// converges on, and was throttled to 98–99 % for 1–3.5 s in the drain
/// benchmark); and one in post-copy its path, less a tenth of it for each
/// other migration on its links.
fn floors(links: &[f64], running: &[Running]) -> Vec<Option<f64>> {
    let path = |r: &Running| links[r.from].min(links[r.to]);
    let mut floors: Vec<Option<f64>> = running
        .iter()
        .map(|r| is_small_need(r.need, path(r)).then_some(r.need))
        .collect();
    let mut nearest: HashMap<usize, usize> = HashMap::new();
    for (i, r) in running.iter().enumerate() {
        let finishes = r.converges_on.is_some_and(|on| on <= path(r));
        if floors[i].is_some() || r.overran || r.postcopy_active || !finishes {
            continue;
        }
        let nearer = nearest
            .get(&r.from)
            .is_none_or(|&j| r.remaining_secs < running[j].remaining_secs);
        if nearer {
            nearest.insert(r.from, i);
        }
    }
    for i in nearest.into_values() {
        floors[i] = running[i].converges_on;
    }
    // A guest in post-copy runs on its destination and waits for every
    // page not there yet: it loses work for as long as post-copy lasts,
    // where a pre-copy writer beside it loses none while it goes
    // unthrottled. So post-copy comes first: its path, less the least
    // part of a link (MIN_NEED) for every other migration on its links.
    for (i, r) in running.iter().enumerate() {
        if !r.postcopy_active {
            continue;
        }
        let others = running
            .iter()
            .enumerate()
            .filter(|&(j, o)| j != i && !o.postcopy_active && (o.from == r.from || o.to == r.to))
            .count();
        let keep = (1.0 - MIN_NEED * others as f64).max(MIN_NEED);
        floors[i] = Some(path(r) * keep);
    }
    floors
}

/// Progressive filling over `capacity` (each side of each host is a
/// link: `h` outbound, `hosts + h` inbound) of the flows not `fixed`,
/// which keep their fixed share.
fn fill(capacity: &[f64], weight: &[f64], running: &[Running], fixed: &[Option<f64>]) -> Vec<f64> {
    // Every unfrozen flow grows at `weight × level`; the link that fills
    // first (the lowest level at which its rest is used up) freezes its
    // flows, whose other side then has less to give.
    let hosts = capacity.len() / 2;
    let mut capacity = capacity.to_vec();
    let mut weights = vec![0.0f64; 2 * hosts];
    let mut flows_on: Vec<Vec<usize>> = vec![Vec::new(); 2 * hosts];
    let mut share: Vec<f64> = fixed.iter().map(|f| f.unwrap_or(0.0)).collect();
    let mut frozen: Vec<bool> = fixed.iter().map(Option::is_some).collect();
    for (i, r) in running.iter().enumerate() {
        if frozen[i] {
            continue;
        }
        for link in [r.from, hosts + r.to] {
            weights[link] += weight[i];
            flows_on[link].push(i);
        }
    }
    // (level, link, version): the smallest level first; an entry whose
    // version is stale is skipped.
    let mut version = vec![0u64; 2 * hosts];
    let mut heap = std::collections::BinaryHeap::new();
    let level_of = |capacity: f64, weight: f64| (capacity.max(0.0) / weight).max(0.0);
    for link in 0..2 * hosts {
        if weights[link] > 0.0 {
            heap.push(Pending(level_of(capacity[link], weights[link]), link, 0));
        }
    }
    while let Some(Pending(level, link, v)) = heap.pop() {
        if v != version[link] || weights[link] <= 1e-12 {
            continue;
        }
        for &f in &flows_on[link] {
            if frozen[f] {
                continue;
            }
            frozen[f] = true;
            share[f] = level * weight[f];
            let r = &running[f];
            for side in [r.from, hosts + r.to] {
                capacity[side] -= share[f];
                weights[side] -= weight[f];
                if side != link && weights[side] > 1e-12 {
                    version[side] += 1;
                    heap.push(Pending(
                        level_of(capacity[side], weights[side]).max(level),
                        side,
                        version[side],
                    ));
                }
            }
        }
        weights[link] = 0.0;
    }
    share
}

/// A link's level in the filling, smallest first out of the heap.
#[derive(Debug, PartialEq)]
struct Pending(f64, usize, u64);

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .0
            .total_cmp(&self.0)
            .then_with(|| other.1.cmp(&self.1))
    }
}

/// One guest to move in a simulated schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    /// The guest.
    pub guest: Guest,
    /// Source host index.
    pub from: usize,
    /// Destination host index.
    pub to: usize,
    /// Its policy allows post-copy ([`Waiting::postcopy`]).
    pub postcopy: bool,
}

/// How one guest fared in a simulated schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moved {
    /// Seconds from the drain's start to its migration's start.
    pub start: f64,
    /// ... to its end.
    pub end: f64,
    /// Guest time lost to throttling and downtime, seconds.
    pub work_lost_secs: f64,
    /// It converged.
    pub converged: bool,
}

/// A simulated schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Seconds until the last guest moved.
    pub makespan: f64,
    /// Guest time lost, all guests, seconds.
    pub work_lost_secs: f64,
    /// Per move, in the order given.
    pub moves: Vec<Moved>,
    /// Most migrations running at once.
    pub peak_parallel: usize,
}

/// A waiting migration as livemig's order sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rank {
    /// Seconds it is predicted to take.
    pub secs: f64,
    /// Its policy lets it go to post-copy.
    pub postcopy: bool,
}

/// livemig's order of two waiting migrations: those allowed to go to
/// post-copy first, the longest first; then the others, the quickest
/// first.
///
/// One allowed post-copy converges on any share and is admitted as soon
/// as the caps let it: its time is its own (the pre-flight's probes, the
/// switch, the pages the guest waits for) more than the link's, so the
/// longest of them, started at once, runs beside everything else rather
/// than after it. In the drain benchmark (all six guests allowed it,
/// inbound caps of two), the four short guests taken first held every
/// slot until 0.8-1.0 s, and the hot and heavy guests ended the drain a
/// second after that; longest first started them at 0.1 s, the short ones
/// beside them: makespan medians 3.69 against 4.14 s over eight
/// alternating pairs (shorter in six), the guests' work lost 0.94
/// against 0.75 s (more of them in post-copy at once).
///
/// The others must converge by pre-copy on the share they get: the
/// guests that move in a second or two leave the source with their
/// vCPUs' load and their bytes before the long migrations begin, which
/// then share the link and the source's CPUs with fewer others (longest
/// first left the long ones throttled on a third of the link beside the
/// short ones for their whole first pass, and the model's rolling
/// upgrade drifted to 2.4x its bound with migrations that never
/// converged).
pub fn by_order(a: Rank, b: Rank) -> std::cmp::Ordering {
    match (a.postcopy, b.postcopy) {
        (true, true) => b.secs.total_cmp(&a.secs),
        (false, false) => a.secs.total_cmp(&b.secs),
        (true, false) => std::cmp::Ordering::Less,
        (false, true) => std::cmp::Ordering::Greater,
    }
}

/// The order a policy takes guests in: livemig's [`by_order`], the fixed
/// policies as listed (by name).
pub fn order(policy: Policy, moves: &[Move], links: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..moves.len()).collect();
    if policy == Policy::Livemig {
        let ranks: Vec<Rank> = moves
            .iter()
            .map(|m| Rank {
                secs: m.guest.cost(links[m.from].min(links[m.to])).secs,
                postcopy: m.postcopy,
            })
            .collect();
        order.sort_by(|&a, &b| {
            by_order(ranks[a], ranks[b]).then_with(|| moves[a].guest.name.cmp(&moves[b].guest.name))
        });
    } else {
        order.sort_by(|&a, &b| moves[a].guest.name.cmp(&moves[b].guest.name));
    }
    order
}

/// Costs at a bandwidth rounded to a 64th of the link, computed once.
struct Costs<'a> {
    moves: &'a [Move],
    links: &'a [f64],
    budgeted: bool,
    memo: HashMap<(usize, u32), crate::plan::Cost>,
}

impl Costs<'_> {
    /// Its cost at `bandwidth`, within the drain's budget if the policy
    /// gives one and it is not small: a small migration
    /// ([`Guest::is_small`]) goes beside others, off the drain's critical
    /// path, and nothing hurries it.
    fn at(&mut self, i: usize, bandwidth: f64) -> crate::plan::Cost {
        let m = &self.moves[i];
        let link = self.links[m.from].min(self.links[m.to]);
        let step = link / 64.0;
        let bucket = (bandwidth / step).round().max(1.0) as u32;
        let budgeted = self.budgeted && !m.guest.is_small(link);
        *self.memo.entry((i, bucket)).or_insert_with(|| {
            let bandwidth = bucket as f64 * step;
            let budget = budgeted.then(|| m.guest.budget(link));
            m.guest.cost_within(bandwidth, link, budget)
        })
    }
}

/// Runs `policy` over `moves` in virtual time. A migration first spends
/// [`SETUP_SECS`] setting up, using no bandwidth, then copies at its share.
pub fn simulate(policy: Policy, caps: Caps, links: &[f64], moves: &[Move]) -> Outcome {
    struct Run {
        i: usize,
        setup_left: f64,
        done: f64,
        started: f64,
        lost: f64,
        min_share: f64,
    }
    let mut costs = Costs {
        moves,
        links,
        budgeted: policy == Policy::Livemig,
        memo: HashMap::new(),
    };
    let path = |i: usize| links[moves[i].from].min(links[moves[i].to]);
    let mut waiting: Vec<usize> = order(policy, moves, links);
    let mut running: Vec<Run> = Vec::new();
    let mut result: Vec<Option<Moved>> = vec![None; moves.len()];
    let mut now = 0.0;
    let mut peak = 0;
    loop {
        let (copying, bw) = share_out(policy, links, moves, &running, |r| {
            let alone = costs.at(r.i, path(r.i)).secs;
            (r.i, r.setup_left <= 0.0, (1.0 - r.done) * alone)
        });
        let mut share_of = vec![None; running.len()];
        for (slot, &k) in copying.iter().enumerate() {
            share_of[k] = Some(bw[slot]);
        }
        let current: Vec<Running> = running
            .iter()
            .zip(&share_of)
            .map(|(r, share)| {
                let m = &moves[r.i];
                let b = share.unwrap_or_else(|| path(r.i));
                Running {
                    from: m.from,
                    to: m.to,
                    need: m.guest.need(path(r.i)),
                    remaining_secs: r.setup_left.max(0.0)
                        + (1.0 - r.done) * costs.at(r.i, b.max(1.0)).secs,
                    overran: false,
                    postcopy_active: false,
                    converges_on: Some(m.guest.converges_on()),
                }
            })
            .collect();
        let candidates: Vec<Waiting> = waiting
            .iter()
            .map(|&i| {
                let need = moves[i].guest.need(path(i));
                Waiting {
                    from: moves[i].from,
                    to: moves[i].to,
                    need,
                    secs: costs.at(i, path(i)).secs,
                    fill_in_secs: moves[i]
                        .guest
                        .is_small(path(i))
                        .then(|| costs.at(i, need).secs),
                    postcopy: moves[i].postcopy,
                }
            })
            .collect();
        let admitted = admit(policy, caps, links, &current, &candidates);
        let mut taken = vec![false; waiting.len()];
        for k in admitted {
            taken[k] = true;
            running.push(Run {
                i: waiting[k],
                setup_left: SETUP_SECS,
                done: 0.0,
                started: now,
                lost: 0.0,
                min_share: f64::INFINITY,
            });
        }
        waiting = waiting
            .into_iter()
            .zip(taken)
            .filter_map(|(i, t)| (!t).then_some(i))
            .collect();
        peak = peak.max(running.len());
        if running.is_empty() {
            break;
        }
        let (copying, bw) = share_out(policy, links, moves, &running, |r| {
            let alone = costs.at(r.i, path(r.i)).secs;
            (r.i, r.setup_left <= 0.0, (1.0 - r.done) * alone)
        });
        // The next event: a setup ends, a migration ends, or one comes
        // within the setup time of its end (which may let the next in).
        let mut step = f64::INFINITY;
        for r in &running {
            if r.setup_left > 0.0 {
                step = step.min(r.setup_left);
            }
        }
        for (&k, &b) in copying.iter().zip(&bw) {
            if b <= 0.0 {
                continue;
            }
            let r = &running[k];
            let left = (1.0 - r.done) * costs.at(r.i, b).secs;
            step = step.min(left);
            if left > SETUP_SECS + 1e-9 {
                step = step.min(left - SETUP_SECS);
            }
        }
        if !step.is_finite() {
            // Nothing can move: a link of no bandwidth.
            break;
        }
        let step = step.max(1e-6);
        now += step;
        for r in running.iter_mut() {
            if r.setup_left > 0.0 {
                r.setup_left -= step;
            }
        }
        for (&k, &b) in copying.iter().zip(&bw) {
            if b > 0.0 {
                let r = &mut running[k];
                let cost = costs.at(r.i, b);
                let share = step / cost.secs.max(1e-9);
                r.done += share;
                r.lost += share * cost.work_lost_secs;
                r.min_share = r.min_share.min(b);
            }
        }
        let mut still = Vec::new();
        for r in running {
            if r.setup_left <= 1e-9 && r.done >= 1.0 - 1e-9 {
                let converged = costs.at(r.i, r.min_share.min(path(r.i))).converges;
                result[r.i] = Some(Moved {
                    start: r.started,
                    end: now,
                    work_lost_secs: r.lost,
                    converged,
                });
            } else {
                still.push(r);
            }
        }
        running = still;
    }
    let moves: Vec<Moved> = result
        .into_iter()
        .map(|m| {
            m.unwrap_or(Moved {
                start: f64::INFINITY,
                end: f64::INFINITY,
                work_lost_secs: 0.0,
                converged: false,
            })
        })
        .collect();
    Outcome {
        makespan: moves.iter().map(|m| m.end).fold(0.0, f64::max),
        work_lost_secs: moves.iter().map(|m| m.work_lost_secs).sum(),
        moves,
        peak_parallel: peak,
    }
}

/// The shares of the runs that copy: their indices in `runs`, and each
/// one's bandwidth.
fn share_out<R>(
    policy: Policy,
    links: &[f64],
    moves: &[Move],
    runs: &[R],
    mut state: impl FnMut(&R) -> (usize, bool, f64),
) -> (Vec<usize>, Vec<f64>) {
    let states: Vec<(usize, bool, f64)> = runs.iter().map(&mut state).collect();
    let copying: Vec<usize> = (0..runs.len()).filter(|&k| states[k].1).collect();
    let view: Vec<Running> = copying
        .iter()
        .map(|&k| {
            let (i, _, remaining_secs) = states[k];
            let m = &moves[i];
            let path = links[m.from].min(links[m.to]);
            Running {
                from: m.from,
                to: m.to,
                need: m.guest.need(path),
                remaining_secs,
                overran: false,
                postcopy_active: false,
                converges_on: Some(m.guest.converges_on()),
            }
        })
        .collect();
    let bw = shares(policy, links, &view);
    (copying, bw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::writer;

    const MIB: f64 = 1048576.0;

    fn mix() -> (Vec<f64>, Vec<Move>) {
        let links = vec![100.0 * MIB; 3];
        let guests = [
            writer("hot", 256, 80.0, 96.0),
            writer("heavy", 256, 40.0, 64.0),
            writer("light", 192, 5.0, 16.0),
            crate::plan::Guest::idle("idle1", 128 << 20),
            crate::plan::Guest::idle("idle2", 128 << 20),
            writer("light2", 128, 2.0, 8.0),
        ];
        let moves = guests
            .into_iter()
            .enumerate()
            .map(|(i, guest)| Move {
                guest,
                from: 0,
                to: 1 + i % 2,
                postcopy: false,
            })
            .collect();
        (links, moves)
    }

    #[test]
    fn shares_never_exceed_a_link_and_livemig_weighs_them_by_need() {
        let links = [100.0, 100.0, 60.0];
        let two = [running(1, 70.0), running(2, 20.0)];
        // Weighed by need: 70 to 20 of a link of 100.
        let s = shares(Policy::Livemig, &links, &two);
        assert!(
            (s[0] - 77.78).abs() < 0.01 && (s[1] - 22.22).abs() < 0.01,
            "{s:?}"
        );
        let s = shares(Policy::All, &links, &two);
        assert_eq!(s, vec![50.0, 50.0]);
        // Two that need the link beside a small one: the small one gets
        // its need, not the 6 % that weighing alone gives it (and that had
        // it throttled); the others split the rest.
        let big = |to| running(to, 100.0);
        let small = Running {
            need: 12.0,
            ..two[1]
        };
        let s = shares(Policy::Livemig, &links, &[big(1), big(2), small]);
        assert!((s[2] - 12.0).abs() < 1e-9, "{s:?}");
        assert!(
            (s[0] - 44.0).abs() < 0.01 && (s[1] - 44.0).abs() < 0.01,
            "{s:?}"
        );
        // Small ones asking more than a link has share it by need.
        let smalls = [
            small,
            small,
            small,
            small,
            Running {
                need: 14.0,
                ..small
            },
        ];
        let s = shares(Policy::Livemig, &[100.0, 100.0, 50.0], &smalls);
        let sum: f64 = s.iter().sum();
        assert!((sum - 50.0).abs() < 1e-9, "{s:?}");
        assert!((s[4] / s[0] - 14.0 / 12.0).abs() < 0.01, "{s:?}");
        let s = shares(Policy::All, &[100.0, 100.0, 30.0], &two);
        assert_eq!(s, vec![70.0, 30.0]);
    }

    #[test]
    fn a_migration_in_post_copy_comes_first_on_its_links() {
        let links = [100.0; 3];
        let writer = |to, postcopy_active| Running {
            postcopy_active,
            ..running(to, 100.0)
        };
        // The link less a tenth for the pre-copy writer beside it.
        let s = shares(
            Policy::Livemig,
            &links,
            &[writer(1, true), writer(2, false)],
        );
        assert!(
            (s[0] - 90.0).abs() < 1e-9 && (s[1] - 10.0).abs() < 1e-9,
            "{s:?}"
        );
        // Two in post-copy on one link share it.
        let s = shares(Policy::Livemig, &links, &[writer(1, true), writer(2, true)]);
        assert!(
            (s[0] - 50.0).abs() < 1e-9 && (s[1] - 50.0).abs() < 1e-9,
            "{s:?}"
        );
        // A small one beside it keeps most of its need: both floors are
        // scaled to the link.
        let small = Running {
            need: 12.0,
            ..writer(2, false)
        };
        let s = shares(Policy::Livemig, &links, &[writer(1, true), small]);
        assert!((s[0] + s[1] - 100.0).abs() < 1e-9, "{s:?}");
        assert!(s[1] >= 11.0 && s[0] >= 80.0, "{s:?}");
        // The fixed policies know nothing of it.
        let s = shares(Policy::All, &links, &[writer(1, true), writer(2, false)]);
        assert!((s[0] - 50.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn caps_are_never_exceeded() {
        let (links, moves) = mix();
        for policy in [
            Policy::Sequential,
            Policy::Fixed(2),
            Policy::All,
            Policy::Livemig,
        ] {
            let caps = Caps {
                outbound: Some(2),
                inbound: Some(1),
                cluster: None,
            };
            let out = simulate(policy, caps, &links, &moves);
            assert!(out.peak_parallel <= 2, "{policy:?}: {out:?}");
            for t in out.moves.iter().map(|m| m.start) {
                let at_once = out
                    .moves
                    .iter()
                    .filter(|m| m.start <= t + 1e-9 && m.end > t + 1e-9)
                    .count();
                assert!(at_once <= 2, "{policy:?} at {t}");
            }
            assert!(out.moves.iter().all(|m| m.end.is_finite()), "{policy:?}");
        }
    }

    #[test]
    fn livemig_beats_the_fixed_policies_and_stays_near_the_bound() {
        let (links, moves) = mix();
        let caps = Caps::default();
        let ours = simulate(Policy::Livemig, caps, &links, &moves);
        let source = crate::plan::tests::host("a", 100.0, 0);
        let hosts = [
            source.clone(),
            crate::plan::tests::host("b", 100.0, 4096),
            crate::plan::tests::host("c", 100.0, 4096),
        ];
        let mut placement = crate::plan::Placement::default();
        for m in &moves {
            placement
                .destination
                .insert(m.guest.name.clone(), hosts[m.to].name.clone());
        }
        let guests: Vec<Guest> = moves.iter().map(|m| m.guest.clone()).collect();
        let bound = crate::plan::lower_bound(&guests, &source, &hosts, &placement);
        assert!(ours.makespan >= bound, "{} < {bound}", ours.makespan);
        // The writers re-send part of their working set: within a quarter
        // of what sending every guest's memory once would take.
        assert!(
            ours.makespan <= bound * 1.25,
            "{} vs {bound}",
            ours.makespan
        );
        for policy in [Policy::Sequential, Policy::Fixed(2), Policy::All] {
            let theirs = simulate(policy, caps, &links, &moves);
            assert!(
                ours.makespan <= theirs.makespan * 1.01,
                "{policy:?}: {} vs ours {}",
                theirs.makespan,
                ours.makespan
            );
            // Sharing the link starves the writers into throttling; only
            // one at a time, at the cost of a third more time, loses less.
            if policy != Policy::Sequential {
                assert!(
                    ours.work_lost_secs < theirs.work_lost_secs / 1.5,
                    "{policy:?}: {} vs ours {}",
                    theirs.work_lost_secs,
                    ours.work_lost_secs
                );
            } else {
                assert!(theirs.makespan > ours.makespan * 1.2);
            }
        }
        assert!(ours.moves.iter().all(|m| m.converged));
    }

    fn waiting(need: f64, fill_in_secs: Option<f64>) -> Waiting {
        Waiting {
            from: 0,
            to: 1,
            need,
            secs: 1.0,
            fill_in_secs,
            postcopy: false,
        }
    }

    /// A migration from host 0 to `to` needing `need`, 5 s from its end.
    fn running(to: usize, need: f64) -> Running {
        Running {
            from: 0,
            to,
            need,
            remaining_secs: 5.0,
            overran: false,
            postcopy_active: false,
            converges_on: None,
        }
    }

    #[test]
    fn the_writer_nearest_its_end_gets_what_it_converges_on_beside_long_ones() {
        let links = [100.0; 3];
        // The drain benchmark's light guest: a 16 MiB working set it
        // rewrites faster than it was measured, so it needs the link
        // (67 MiB/s to converge unthrottled), 0.4 s from its end; two long
        // writers admitted beside it.
        let finishing = Running {
            remaining_secs: 0.4,
            converges_on: Some(67.0),
            ..running(1, 100.0)
        };
        let long = |to| Running {
            remaining_secs: 3.0,
            converges_on: Some(1000.0),
            ..running(to, 100.0)
        };
        let s = shares(Policy::Livemig, &links, &[finishing, long(1), long(2)]);
        assert!((s[0] - 67.0).abs() < 1e-9, "{s:?}");
        assert!(
            (s[1] - 16.5).abs() < 1e-9 && (s[2] - 16.5).abs() < 1e-9,
            "{s:?}"
        );
        // Only the nearest: a second one further from its end is weighed.
        let later = Running {
            remaining_secs: 1.0,
            ..finishing
        };
        let s = shares(Policy::Livemig, &links, &[later, finishing, long(2)]);
        assert!((s[1] - 67.0).abs() < 1e-9, "{s:?}");
        assert!((s[0] - 16.5).abs() < 1e-9, "{s:?}");
        // Not one past its prediction (its remaining time says nothing),
        // nor one in post-copy (weighed by its own rule).
        for r in [
            Running {
                overran: true,
                ..finishing
            },
            Running {
                postcopy_active: true,
                ..finishing
            },
        ] {
            let s = shares(Policy::Livemig, &links, &[r, long(1), long(2)]);
            assert!(s[0] != 67.0, "{s:?}");
        }
        // The fixed policies know nothing of it.
        let s = shares(Policy::All, &links, &[finishing, long(1), long(2)]);
        assert!((s[0] - 100.0 / 3.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn small_migrations_go_beside_one_that_holds_the_link_if_they_end_inside_it() {
        let links = [100.0; 3];
        let holder = running(2, 100.0);
        let waiting = [
            // Needs the link: waits.
            waiting(100.0, None),
            // Small and done in time.
            waiting(10.0, Some(1.0)),
            // Small but would outlast the holder.
            waiting(10.0, Some(10.0)),
            // Small, done in time: two more fit in a third of the link...
            waiting(10.0, Some(2.0)),
            waiting(10.0, Some(2.0)),
            // ... and not a third.
            waiting(10.0, Some(2.0)),
        ];
        let admitted = admit(
            Policy::Livemig,
            Caps::default(),
            &links,
            &[holder],
            &waiting,
        );
        assert_eq!(admitted, [1, 3, 4]);
        // A holder near its end counts no more: the one that needs the
        // link goes, and a small one beside it if it ends inside its
        // predicted second.
        let near_end = Running {
            remaining_secs: SETUP_SECS / 2.0,
            ..holder
        };
        let admitted = admit(
            Policy::Livemig,
            Caps::default(),
            &links,
            &[near_end],
            &waiting,
        );
        assert_eq!(admitted, [0, 1]);
        // A holder past its predicted time reads its second left from its
        // bytes alone (a throttled writer between passes), and may hold
        // the link for any time yet: the small ones go beside it whatever
        // they take.
        let overran = Running {
            overran: true,
            remaining_secs: 1.0,
            ..holder
        };
        let admitted = admit(
            Policy::Livemig,
            Caps::default(),
            &links,
            &[overran],
            &waiting,
        );
        assert_eq!(admitted, [1, 2, 3]);
        let on_time = Running {
            overran: false,
            ..overran
        };
        let admitted = admit(
            Policy::Livemig,
            Caps::default(),
            &links,
            &[on_time],
            &waiting,
        );
        assert!(admitted.is_empty(), "{admitted:?}");
        // The fixed policies know nothing of it.
        let admitted = admit(
            Policy::Fixed(2),
            Caps::default(),
            &links,
            &[holder],
            &waiting,
        );
        assert_eq!(admitted, [0]);
    }

    #[test]
    fn a_migration_that_may_go_to_post_copy_waits_for_the_caps_not_for_room() {
        let links = [100.0; 3];
        let holder = running(2, 100.0);
        let writer = Waiting {
            postcopy: true,
            ..waiting(100.0, None)
        };
        let admit_with = |caps: Caps, running: &[Running]| {
            admit(
                Policy::Livemig,
                caps,
                &links,
                running,
                &[writer, waiting(100.0, None)],
            )
        };
        // Beside a holder: the one that may go to post-copy goes, the
        // other waits for room.
        assert_eq!(admit_with(Caps::default(), &[holder]), [0]);
        // The caps bind all the same.
        let one_in = Caps {
            inbound: Some(1),
            ..Caps::default()
        };
        let into_b = Running { to: 1, ..holder };
        assert!(admit_with(one_in, &[into_b]).is_empty());
        let two_out = Caps {
            outbound: Some(2),
            ..Caps::default()
        };
        assert_eq!(admit_with(two_out, &[holder]), [0]);
        assert!(admit_with(two_out, &[holder, holder]).is_empty());
    }

    #[test]
    fn the_simulation_admits_post_copy_migrations_as_the_controller_does() {
        let links = vec![100.0 * MIB; 3];
        let moves = |postcopy| -> Vec<Move> {
            (0..2)
                .map(|i| Move {
                    guest: writer(&format!("w{i}"), 256, 80.0, 64.0),
                    from: 0,
                    to: 1 + i,
                    postcopy,
                })
                .collect()
        };
        // Each needs the whole link: the second starts in the first's
        // last setup time ...
        let apart = simulate(Policy::Livemig, Caps::default(), &links, &moves(false));
        assert!(
            apart.moves[1].start >= apart.moves[0].end - SETUP_SECS - 1e-6,
            "{apart:?}"
        );
        // ... unless they may go to post-copy.
        let together = simulate(Policy::Livemig, Caps::default(), &links, &moves(true));
        assert!(
            together.moves.iter().all(|m| m.start == 0.0),
            "{together:?}"
        );
    }

    #[test]
    fn guests_allowed_post_copy_go_longest_first_and_the_others_quickest_first() {
        let links = vec![100.0 * MIB; 3];
        let a_move = |name: &str, rate: f64, ws: f64, postcopy: bool, to: usize| Move {
            guest: writer(name, 256, rate, ws),
            from: 0,
            to,
            postcopy,
        };
        let moves = [
            a_move("a-light", 8.0, 8.0, true, 1),
            a_move("b-hot", 400.0, 64.0, true, 2),
            a_move("c-quiet", 0.5, 1.0, false, 1),
            a_move("d-slow", 60.0, 64.0, false, 2),
        ];
        let secs = |i: usize| moves[i].guest.cost(links[0]).secs;
        assert!(
            secs(1) > secs(0) && secs(3) > secs(2),
            "{:?}",
            (0..4).map(secs).collect::<Vec<_>>()
        );
        assert_eq!(order(Policy::Livemig, &moves, &links), [1, 0, 2, 3]);
        // With one migration into each host at a time, the two allowed
        // post-copy take the slots at once, the longest on its own host,
        // so it does not wait behind the short ones.
        let caps = Caps {
            inbound: Some(1),
            ..Caps::default()
        };
        let out = simulate(Policy::Livemig, caps, &links, &moves);
        assert_eq!(out.moves[1].start, 0.0, "{out:?}");
        assert_eq!(out.moves[0].start, 0.0, "{out:?}");
        assert!(
            out.moves[3].start >= out.moves[1].end - SETUP_SECS - 1e-6,
            "{out:?}"
        );
        // The fixed policies take them by name.
        assert_eq!(order(Policy::Fixed(2), &moves, &links), [0, 1, 2, 3]);
    }

    #[test]
    fn small_guests_move_while_a_hot_one_holds_the_link_and_the_drain_ends_with_it() {
        let links = vec![100.0 * MIB; 3];
        let small = |name: &str, in_use: f64, rate: f64, ws: f64| {
            let mut g = writer(name, 128, rate, ws);
            g.first_pass_bytes = in_use * MIB;
            g
        };
        let mut hot = writer("hot", 256, 400.0, 64.0);
        hot.first_pass_bytes = 240.0 * MIB;
        hot.model.rate_is_lower_bound = true;
        let guests = [
            hot,
            small("light1", 12.0, 8.0, 8.0),
            small("light2", 20.0, 8.0, 16.0),
            small("quiet1", 4.0, 0.5, 1.0),
            small("quiet2", 4.0, 0.5, 1.0),
        ];
        let moves: Vec<Move> = guests
            .into_iter()
            .enumerate()
            .map(|(i, guest)| Move {
                guest,
                from: 0,
                to: 1 + i % 2,
                postcopy: false,
            })
            .collect();
        assert!(
            moves[1].guest.is_small(links[0]),
            "{:?}",
            moves[1].guest.need(links[0]) / MIB
        );
        assert!(!moves[0].guest.is_small(links[0]));
        let out = simulate(Policy::Livemig, Caps::default(), &links, &moves);
        let hot_end = out.moves[0].end;
        for (m, moved) in moves.iter().zip(&out.moves).skip(1) {
            // The light writers go beside it; the quiet ones, once the
            // light ones leave room, at the latest in its last setup's
            // time, as everything does.
            let by = if m.guest.name.starts_with("light") {
                hot_end
            } else {
                hot_end + SETUP_SECS
            };
            assert!(
                moved.end <= by && moved.converged,
                "{} ended at {:.2} s, the hot guest at {hot_end:.2} s",
                m.guest.name,
                moved.end
            );
            // Unthrottled: nothing lost beyond the stop-and-copy.
            assert!(moved.work_lost_secs <= 0.31, "{}: {moved:?}", m.guest.name);
        }
        assert!(out.makespan <= hot_end + SETUP_SECS);
        // Moving them after it would end the drain later.
        let sequential = simulate(Policy::Sequential, Caps::default(), &links, &moves);
        assert!(sequential.makespan > out.makespan, "{sequential:?}");
    }
}
