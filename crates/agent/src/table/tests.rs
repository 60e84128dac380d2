use std::sync::Mutex;
use std::time::Duration;

use migration::record::{JobIdentity, PhaseClock};
use migration::Flags;
use protocol::job::{JobStatus, Phase, Role};
use protocol::ErrorCode;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;

fn definition(name: &str, memory_mib: u32) -> DomainDefinition {
    DomainDefinition::from_toml(&format!(
        "name = \"{name}\"\nmemory_mib = {memory_mib}\n[kernel]\npath = \"/k\"\n"
    ))
    .unwrap()
}

fn name(n: &str) -> DomainName {
    n.parse().unwrap()
}

fn ident(id: &str, domain: &str, role: Role) -> JobIdentity {
    JobIdentity {
        id: id.into(),
        domain: domain.into(),
        role,
        source: "tls://a:7000".into(),
        destination: "tls://b:7000".into(),
        flags: Flags::default(),
        started_at_ms: 0,
        peer: None,
    }
}

fn incoming(
    id: &str,
    arriving: &DomainDefinition,
    created: bool,
    replaced: Option<DomainDefinition>,
) -> IncomingJob {
    IncomingJob {
        ident: ident(id, arriving.name.as_str(), Role::Destination),
        started: Instant::now(),
        connection: 7,
        prepared_by: Some("agent-a".into()),
        created_domain: created,
        disk_bytes: 0,
        previous: Default::default(),
        vm: None,
        phase: Mutex::new(Phase::Prepare),
        definition: arriving.clone(),
        replaced_definition: replaced,
        reattached: false,
        created_images: Vec::new(),
        postcopy_resume: Default::default(),
    }
}

fn outgoing(id: &str, domain: &str) -> Arc<OutgoingJob> {
    let (_, progress) = watch::channel(Default::default());
    let (retune, retunes) = mpsc::channel(1);
    Arc::new(OutgoingJob {
        ident: ident(id, domain, Role::Source),
        started: Instant::now(),
        clock: PhaseClock::new(Instant::now(), Phase::Begin),
        cancel: CancellationToken::new(),
        progress,
        retune,
        retunes: Mutex::new(Some(retunes)),
        storage: Vec::new(),
    })
}

fn record(job: &str, status: JobStatus) -> JobRecord {
    ident(job, "vm", Role::Source).record(status, Phase::Done, Duration::from_secs(1))
}

#[test]
fn a_domain_is_transient_until_its_definition_is_saved() {
    let table = DomainTable::default();
    let def = definition("vm", 64);

    table.enter(&def);
    assert!(!table.persistent(&name("vm")).unwrap());
    table.drop_if_transient_and_idle(&name("vm"));
    assert_eq!(table.len(), 0, "a failed define leaves nothing");

    table.enter(&def);
    table.defined(def.clone()).unwrap();
    table.drop_if_transient_and_idle(&name("vm"));
    assert!(table.persistent(&name("vm")).unwrap());
    table.undefined(&name("vm")).unwrap();
    table.drop_if_transient_and_idle(&name("vm"));
    assert!(table.get(&name("vm")).is_err());
}

#[test]
fn an_unknown_domain_is_a_clear_error_everywhere() {
    let table = DomainTable::default();
    let vm = name("nosuch");
    for err in [
        table.get(&vm).map(|_| ()).unwrap_err(),
        table.op_lock(&vm).map(|_| ()).unwrap_err(),
        table.startable(&vm).map(|_| ()).unwrap_err(),
        table.take_vm(&vm).map(|_| ()).unwrap_err(),
        table.migratable(&vm, false).map(|_| ()).unwrap_err(),
    ] {
        assert_eq!(err.code, ErrorCode::NoDomain);
    }
}

#[test]
fn an_arriving_domain_new_here_is_forgotten_if_it_does_not_land() {
    let table = DomainTable::default();
    let arriving = definition("vm", 64);

    let (created, replaced) = table
        .reserve_incoming(
            &arriving,
            |c, r| incoming("j1", &arriving, c, r),
            "tls://b",
            |_| Ok(()),
        )
        .unwrap();

    assert!(created && replaced.is_none());
    let view = table.get(&name("vm")).unwrap();
    assert!(matches!(view.job, Some(ActiveJob::Incoming(_))));
    assert!(
        table.startable(&name("vm")).is_err(),
        "it cannot start here"
    );
    let again = table.reserve_incoming(
        &arriving,
        |c, r| incoming("j2", &arriving, c, r),
        "tls://b",
        |_| Ok(()),
    );
    assert!(again
        .unwrap_err()
        .message
        .contains("already running on tls://b"));

    table.forget_incoming(&name("vm"), "another-job");
    assert!(
        table.get(&name("vm")).is_ok(),
        "another job's end changes nothing"
    );
    table.forget_incoming(&name("vm"), "j1");
    assert!(table.get(&name("vm")).is_err());
}

#[test]
fn an_arriving_domain_known_here_gets_its_own_definition_back_if_it_does_not_land() {
    let table = DomainTable::default();
    let own = definition("vm", 96);
    table.enter(&own);
    table.defined(own.clone()).unwrap();
    let arriving = definition("vm", 64);

    let (created, replaced) = table
        .reserve_incoming(
            &arriving,
            |c, r| incoming("j1", &arriving, c, r),
            "tls://b",
            |_| Ok(()),
        )
        .unwrap();
    assert!(!created);
    assert_eq!(replaced.as_ref().map(|d| d.memory_mib), Some(96));
    let job = incoming("j1", &arriving, created, replaced);
    table.prepared_incoming(Arc::new(job)).unwrap();
    assert_eq!(table.get(&name("vm")).unwrap().definition.memory_mib, 64);

    table.forget_incoming(&name("vm"), "j1");

    let view = table.get(&name("vm")).unwrap();
    assert_eq!(view.definition.memory_mib, 96);
    assert!(view.persistent && view.job.is_none() && view.vm.is_none());
}

#[test]
fn a_landed_incoming_job_ends_with_its_record() {
    let table = DomainTable::default();
    let arriving = definition("vm", 64);
    table
        .reserve_incoming(
            &arriving,
            |c, r| incoming("j1", &arriving, c, r),
            "tls://b",
            |_| Ok(()),
        )
        .unwrap();
    assert!(table.find_job("j1").is_some());
    assert_eq!(table.incoming(|j| j.connection == 7).len(), 1);
    assert!(table.find_incoming("j1").is_some());

    table.end_job(&name("vm"), "j1", record("j1", JobStatus::Completed));

    let view = table.get(&name("vm")).unwrap();
    assert!(view.job.is_none());
    assert_eq!(view.last_job.unwrap().id, "j1");
    assert!(table.find_job("j1").is_none());
}

#[test]
fn an_offline_migration_needs_a_persistent_domain_and_a_live_one_a_running_vm() {
    let table = DomainTable::default();
    let def = definition("vm", 64);
    table.enter(&def);

    let offline = table.migratable(&name("vm"), true).unwrap_err();
    assert!(offline.message.contains("transient"), "{}", offline.message);
    table.defined(def).unwrap();
    let live = table.migratable(&name("vm"), false).unwrap_err();
    assert!(live.message.contains("not running"), "{}", live.message);
    let (_, vm, _) = table.migratable(&name("vm"), true).unwrap();
    assert!(vm.is_none());
}

#[test]
fn one_outgoing_job_at_a_time_and_its_end_leaves_the_domain_shut_off() {
    let table = DomainTable::default();
    let def = definition("vm", 64);
    table.enter(&def);
    table.defined(def).unwrap();

    table
        .begin_outgoing(&name("vm"), outgoing("j1", "vm"))
        .unwrap();
    let second = table.begin_outgoing(&name("vm"), outgoing("j2", "vm"));
    assert!(second.unwrap_err().message.contains("(j1)"));
    assert!(table.migratable(&name("vm"), true).is_err());
    assert_eq!(table.outgoing().len(), 1);
    let destroy = table.take_vm(&name("vm")).unwrap_err();
    assert!(
        destroy.message.contains("domjobabort"),
        "{}",
        destroy.message
    );

    table.end_job(&name("vm"), "j1", record("j1", JobStatus::Cancelled));

    let view = table.get(&name("vm")).unwrap();
    assert!(view.job.is_none() && view.vm.is_none());
    assert_eq!(view.last_job.unwrap().status, JobStatus::Cancelled);
    assert!(table.outgoing().is_empty());
}

#[test]
fn limits_are_kept_for_the_next_migration_and_a_zero_downtime_changes_nothing() {
    let table = DomainTable::default();
    let def = definition("vm", 64);
    table.enter(&def);

    let running = table
        .retune(
            &name("vm"),
            Tunables {
                bandwidth_mib_s: Some(7),
                downtime_ms: Some(450),
            },
        )
        .unwrap();
    assert!(running.is_none(), "no job to take them now");
    let zero = table.retune(
        &name("vm"),
        Tunables {
            bandwidth_mib_s: Some(9),
            downtime_ms: Some(0),
        },
    );
    assert!(zero.is_err());
    let kept = table.tunables(&name("vm")).unwrap();
    assert_eq!(
        (kept.bandwidth_mib_s, kept.downtime_ms),
        (Some(7), Some(450))
    );
}
