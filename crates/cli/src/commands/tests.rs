//! Each handler against a scripted agent: the request it sends, and what
//! it prints for the reply.

use protocol::domain::{DomainState, DomainSummary};
use protocol::job::{JobStatus, Phase, Role};
use protocol::scripted::{Answer, ScriptedAgent};
use protocol::{ApiError, ErrorCode, Reply, Request};

use super::*;
use crate::args::{DomainArg, Json};

/// A client of a scripted agent that answers every request with `answer`.
async fn agent(answer: impl Fn(&Request) -> Answer + Send + 'static) -> (ScriptedAgent, Client) {
    let dir = tempfile::tempdir().unwrap().keep();
    let agent = ScriptedAgent::start(&dir, answer);
    let client = Client::connect(&agent.uri()).await.unwrap();
    (agent, client)
}

fn record(status: JobStatus) -> protocol::job::JobRecord {
    migration::record::JobIdentity {
        id: "j1".into(),
        domain: "web1".into(),
        role: Role::Source,
        source: "tls://a:7000".into(),
        destination: "tls://b:7000".into(),
        flags: migration::Flags::default(),
        started_at_ms: 0,
        peer: None,
    }
    .record(status, Phase::Done, std::time::Duration::from_secs(2))
}

#[tokio::test]
async fn list_asks_for_shut_off_domains_only_with_all_and_prints_the_table() {
    let (agent, client) = agent(|_| {
        Answer::Reply(Reply::Domains {
            domains: vec![DomainSummary {
                id: Some(1),
                name: "web1".into(),
                state: DomainState::Running,
                persistent: true,
            }],
        })
    })
    .await;

    let text = execute(
        &client,
        Command::List {
            all: true,
            json: Json { json: false },
        },
    )
    .await
    .unwrap();

    assert_eq!(agent.requests(), [Request::List { all: true }]);
    assert!(text.contains(" 1    web1   running"), "{text}");
}

#[tokio::test]
async fn start_names_the_domain_and_says_it_started() {
    let (agent, client) = agent(|_| Answer::Reply(Reply::Done)).await;

    let text = execute(
        &client,
        Command::Start {
            domain: "web1".into(),
            paused: true,
        },
    )
    .await
    .unwrap();

    assert_eq!(
        agent.requests(),
        [Request::Start {
            domain: "web1".parse().unwrap(),
            paused: true
        }]
    );
    assert_eq!(text, "Domain 'web1' started\n");
}

#[tokio::test]
async fn a_domain_with_no_job_has_job_type_none() {
    let (_agent, client) = agent(|_| Answer::Reply(Reply::JobInfo { job: None })).await;

    let text = execute(
        &client,
        Command::Domjobinfo {
            domain: "web1".into(),
            completed: false,
            keep_completed: false,
            json: Json { json: false },
        },
    )
    .await
    .unwrap();

    assert_eq!(text, "Job type:  None\n");
}

#[tokio::test]
async fn a_finished_job_prints_its_record_and_json_its_fields() {
    let (_agent, client) = agent(|_| {
        Answer::Reply(Reply::Job {
            active: None,
            record: Some(Box::new(record(JobStatus::Completed))),
        })
    })
    .await;
    let job = |json| Command::Job {
        id: "j1".into(),
        json: Json { json },
    };

    let text = execute(&client, job(false)).await.unwrap();
    let line = execute(&client, job(true)).await.unwrap();

    assert!(
        text.contains("Migration of 'web1' to tls://b:7000 completed"),
        "{text}"
    );
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["status"], "completed");
}

#[tokio::test]
async fn a_refusal_comes_back_as_the_agents_error() {
    let (_agent, client) = agent(|_| {
        Answer::Error(ApiError::new(
            ErrorCode::NoDomain,
            "no domain named 'nosuch'",
        ))
    })
    .await;

    let err = execute(
        &client,
        Command::Destroy(DomainArg {
            domain: "nosuch".into(),
        }),
    )
    .await
    .unwrap_err();

    assert!(
        err.to_string().contains("no domain named 'nosuch'"),
        "{err}"
    );
    assert!(crate::hints::hint(&err).unwrap().contains("list --all"));
}

#[tokio::test]
async fn a_reply_of_another_kind_is_an_error_naming_the_request() {
    let (_agent, client) = agent(|_| Answer::Reply(Reply::Done)).await;

    let err = execute(
        &client,
        Command::Dominfo {
            domain: "web1".into(),
            json: Json { json: false },
        },
    )
    .await
    .unwrap_err();

    assert!(
        err.to_string().contains("answered `dom-info` with Done"),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_domain_name_is_refused_before_anything_is_sent() {
    let (agent, client) = agent(|_| Answer::Reply(Reply::Done)).await;

    let err = execute(
        &client,
        Command::Suspend(DomainArg {
            domain: "../etc".into(),
        }),
    )
    .await
    .unwrap_err();

    assert!(err.to_string().contains("invalid domain name"), "{err}");
    assert!(agent.requests().is_empty());
}

#[test]
fn the_man_page_and_completions_are_generated() {
    assert!(local::man().unwrap().contains(".TH livemig"));
    let bash = local::completions(clap_complete::Shell::Bash).unwrap();
    assert!(bash.contains("migrate"));
}
