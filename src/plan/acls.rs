//! `weir plan --emit acls`: the Kafka ACLs a pipeline needs, as a Strimzi `KafkaUser`
//! (simple authorization), from the same plan that names every topic weir touches.

use std::fmt::Write as _;

use super::Pipeline;
use crate::config::{DeliveryMode, SourceTopics};

/// One ACL rule: a resource (type, name, literal or prefix) and the operations allowed.
struct Rule {
    resource: &'static str,
    name: String,
    prefix: bool,
    operations: &'static [&'static str],
    why: String,
}

fn rules(pipeline: &Pipeline) -> (Vec<Rule>, Vec<String>) {
    let name = &pipeline.name;
    let mut rules = Vec::new();
    let mut notes = Vec::new();
    let mut read = |source: &crate::config::Source, what: &str, notes: &mut Vec<String>| match &source.topics {
        SourceTopics::List(topics) => {
            for topic in topics {
                rules.push(Rule {
                    resource: "topic",
                    name: topic.clone(),
                    prefix: false,
                    operations: &["Read", "Describe"],
                    why: format!("{what} {}", source.name),
                });
            }
        }
        SourceTopics::Pattern(pattern) => notes.push(format!(
            "{what} {} reads the topics matching /{pattern}/: allow Read and Describe on them (a prefix rule, if they share one)",
            source.name
        )),
    };
    for source in pipeline.sources() {
        read(source, "source", &mut notes);
    }
    for table in &pipeline.tables {
        read(table, "table", &mut notes);
    }
    for sink in pipeline.sinks() {
        rules.push(Rule {
            resource: "topic",
            name: sink.topic.clone(),
            prefix: false,
            // DescribeConfigs: weir reads max.message.bytes to size its record batches.
            operations: &["Write", "Describe", "DescribeConfigs"],
            why: "sink".into(),
        });
    }
    rules.push(Rule {
        resource: "topic",
        name: pipeline.dlq_topic.clone(),
        prefix: false,
        // Create: weir creates the DLQ when it is missing.
        operations: &["Write", "Describe", "DescribeConfigs", "Create"],
        why: "dead letters".into(),
    });
    if !pipeline.stateful_steps().is_empty() || !pipeline.repartition_topics().is_empty() {
        rules.push(Rule {
            resource: "topic",
            name: format!("{name}-"),
            prefix: true,
            // Created at start; read back on restore; repartitions purged (DeleteRecords);
            // deleted by `weir reset`.
            operations: &["Read", "Write", "Create", "Describe", "DescribeConfigs", "DeleteRecords", "Delete"],
            why: "internal topics: changelogs, repartitions, step definitions".into(),
        });
    }
    rules.push(Rule {
        resource: "group",
        name: name.clone(),
        prefix: false,
        operations: &["Read", "Describe"],
        why: "the consumer group; offsets are committed in the transactions".into(),
    });
    if !pipeline.tables.is_empty() {
        rules.push(Rule {
            resource: "group",
            name: format!("{name}-tables"),
            prefix: false,
            operations: &["Read", "Describe"],
            why: "the group id the table readers carry (never joined, nothing committed)".into(),
        });
    }
    match pipeline.mode() {
        DeliveryMode::Transactional => rules.push(Rule {
            resource: "transactionalId",
            name: format!("{name}-"),
            prefix: true,
            operations: &["Write", "Describe"],
            why: "one transactional id per instance: <name>-<instance>".into(),
        }),
        DeliveryMode::IdempotentUpsert => {
            notes.push("idempotent_upsert: no transactional id; brokers before Kafka 3.0 also want IdempotentWrite on the cluster".into())
        }
    }
    (rules, notes)
}

/// A Strimzi `KafkaUser` named after the pipeline, with SCRAM-SHA-512 authentication and
/// the ACLs the pipeline needs.
pub fn kafka_user(pipeline: &Pipeline) -> String {
    let (rules, notes) = rules(pipeline);
    let mut text = String::new();
    let _ = writeln!(text, "# The Kafka ACLs weir pipeline {} needs, as a Strimzi KafkaUser (`weir plan --emit acls`).", pipeline.name);
    let _ = writeln!(text, "# Set the strimzi.io/cluster label to your Kafka cluster's name; keep the rules with another authentication.");
    for note in &notes {
        let _ = writeln!(text, "# NOTE: {note}");
    }
    let _ = writeln!(text, "apiVersion: kafka.strimzi.io/v1beta2");
    let _ = writeln!(text, "kind: KafkaUser");
    let _ = writeln!(text, "metadata:");
    let _ = writeln!(text, "  name: {}", pipeline.name);
    let _ = writeln!(text, "  labels:");
    let _ = writeln!(text, "    strimzi.io/cluster: my-cluster");
    let _ = writeln!(text, "spec:");
    let _ = writeln!(text, "  authentication:");
    let _ = writeln!(text, "    type: scram-sha-512");
    let _ = writeln!(text, "  authorization:");
    let _ = writeln!(text, "    type: simple");
    let _ = writeln!(text, "    acls:");
    for rule in rules {
        let _ = writeln!(text, "      # {}", rule.why);
        let _ = writeln!(text, "      - resource:");
        let _ = writeln!(text, "          type: {}", rule.resource);
        let _ = writeln!(text, "          name: {}", serde_json::Value::String(rule.name));
        let _ = writeln!(text, "          patternType: {}", if rule.prefix { "prefix" } else { "literal" });
        let _ = writeln!(text, "        operations: [{}]", rule.operations.join(", "));
    }
    text
}
