//! Start-up checks of the topic against the gateway's promises: that the largest body the
//! gateway accepts fits in a record the topic takes (one size contract), and that a broker's
//! loss cannot lose an acknowledged hit (durability). Read with DescribeConfigs; a broker that
//! does not answer it (or leaves a setting out) is logged and the gateway goes on.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

use crate::config::Config;
use crate::publisher::required_message_bytes;

/// What the broker told about the topic. `None` where it did not say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicFacts {
    pub max_message_bytes: Option<usize>,
    pub min_insync_replicas: Option<u32>,
    pub unclean_leader_election: Option<bool>,
    /// Brokers in the cluster.
    pub brokers: usize,
    /// The fewest replicas of any partition.
    pub replication: usize,
}

/// The verdict: problems that stop the start (each naming the setting to change) and
/// warnings to log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub fatal: Vec<String>,
    pub warnings: Vec<String>,
}

/// Judges the facts; pure, so every rule is unit-tested.
pub fn judge(topic: &str, facts: &TopicFacts, max_body: usize, require_durable: bool) -> Verdict {
    let mut verdict = Verdict::default();
    let needed = required_message_bytes(max_body);
    match facts.max_message_bytes {
        Some(limit) if limit < needed => verdict.fatal.push(format!(
            "topic {topic} takes records of at most {limit} bytes (max.message.bytes) but HOOKPIPE_MAX_BODY_BYTES={max_body} needs {needed}: raise the topic's max.message.bytes to at least {needed}, or lower HOOKPIPE_MAX_BODY_BYTES to at most {}",
            limit.saturating_sub(needed - max_body)
        )),
        Some(_) => {}
        None => verdict.warnings.push(format!(
            "the broker did not report topic {topic}'s max.message.bytes: not checked (it must be at least {needed} for HOOKPIPE_MAX_BODY_BYTES={max_body})"
        )),
    }
    // One broker has nothing to fail over to: the durability rules are about clusters.
    if facts.brokers > 1 {
        let mut risks = Vec::new();
        if facts.replication < 2 {
            risks.push(format!("a partition has {} replica(s)", facts.replication));
        }
        match facts.min_insync_replicas {
            Some(n) if n < 2 => risks.push(format!("min.insync.replicas is {n}")),
            Some(_) => {}
            None => risks.push("min.insync.replicas was not reported".into()),
        }
        if facts.unclean_leader_election == Some(true) {
            risks.push("unclean.leader.election.enable is true".into());
        }
        if !risks.is_empty() {
            let message = format!(
                "topic {topic} can lose acknowledged hits when one of its {} brokers fails ({}); set replication factor 3, min.insync.replicas=2 and unclean.leader.election.enable=false (docs/operations.md)",
                facts.brokers,
                risks.join(", ")
            );
            if require_durable {
                verdict
                    .fatal
                    .push(format!("{message}; HOOKPIPE_REQUIRE_DURABLE_TOPIC is true"));
            } else {
                verdict.warnings.push(message);
            }
        }
    }
    verdict
}

/// Reads the facts from the broker. `Err` when the broker does not answer DescribeConfigs.
pub async fn read_facts(
    client_config: &ClientConfig,
    topic: &str,
    timeout: Duration,
) -> Result<TopicFacts, String> {
    let admin: AdminClient<DefaultClientContext> = client_config
        .create()
        .map_err(|e| format!("admin client: {e}"))?;
    let metadata = {
        let client = admin.inner();
        let topic = topic.to_owned();
        // Blocking call; the admin client is used only at start-up.
        tokio::task::block_in_place(|| client.fetch_metadata(Some(&topic), timeout))
            .map_err(|e| format!("broker metadata: {e}"))?
    };
    let replication = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| p.replicas().len())
        .min()
        .unwrap_or(0);
    let mut facts = TopicFacts {
        brokers: metadata.brokers().len(),
        replication,
        ..TopicFacts::default()
    };
    let results = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(timeout)),
        )
        .await
        .map_err(|e| format!("DescribeConfigs: {e}"))?;
    let resource = results
        .into_iter()
        .next()
        .ok_or("DescribeConfigs: no answer for the topic")?
        .map_err(|code| format!("DescribeConfigs: {code:?}"))?;
    let value = |name: &str| {
        resource
            .get(name)
            .and_then(|entry| entry.value.clone())
            .filter(|v| !v.is_empty())
    };
    facts.max_message_bytes = value("max.message.bytes").and_then(|v| v.parse().ok());
    facts.min_insync_replicas = value("min.insync.replicas").and_then(|v| v.parse().ok());
    facts.unclean_leader_election =
        value("unclean.leader.election.enable").and_then(|v| v.parse().ok());
    Ok(facts)
}

/// Runs the checks at start-up: `Err` with the message to exit with when the gateway must not
/// start; warnings are logged.
pub async fn at_start_up(client_config: &ClientConfig, config: &Config) -> Result<(), String> {
    let topic = &config.kafka.topic;
    let facts = match read_facts(client_config, topic, Duration::from_secs(10)).await {
        Ok(facts) => facts,
        Err(problem) => {
            tracing::warn!(topic, %problem, "could not read the topic's configuration; its size and durability settings are not checked");
            return Ok(());
        }
    };
    tracing::info!(topic, ?facts, "topic configuration");
    let verdict = judge(
        topic,
        &facts,
        config.max_body_bytes,
        config.require_durable_topic,
    );
    for warning in &verdict.warnings {
        tracing::warn!("{warning}");
    }
    match verdict.fatal.is_empty() {
        true => Ok(()),
        false => Err(verdict.fatal.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn single() -> TopicFacts {
        TopicFacts {
            max_message_bytes: Some(required_message_bytes(MIB)),
            brokers: 1,
            replication: 1,
            ..TopicFacts::default()
        }
    }

    #[test]
    fn a_topic_that_fits_the_largest_body_passes() {
        assert_eq!(judge("t", &single(), MIB, true), Verdict::default());
    }

    #[test]
    fn a_topic_too_small_for_the_body_limit_stops_the_start_naming_both_settings() {
        let facts = TopicFacts {
            max_message_bytes: Some(1_048_588), // Kafka's default
            ..single()
        };
        let verdict = judge("webhooks", &facts, MIB, false);
        assert_eq!(verdict.fatal.len(), 1, "{verdict:?}");
        let message = &verdict.fatal[0];
        assert!(message.contains("max.message.bytes"), "{message}");
        assert!(
            message.contains("HOOKPIPE_MAX_BODY_BYTES=1048576"),
            "{message}"
        );
        assert!(message.contains("at least 1115136"), "{message}");
        assert!(message.contains("at most 982028"), "{message}");
        // The advice holds: the lowered limit fits.
        assert!(required_message_bytes(982_028) <= 1_048_588);
        assert!(required_message_bytes(982_029) > 1_048_588);
    }

    #[test]
    fn an_unreported_size_is_a_warning_not_a_stop() {
        let facts = TopicFacts {
            max_message_bytes: None,
            ..single()
        };
        let verdict = judge("t", &facts, MIB, true);
        assert!(verdict.fatal.is_empty());
        assert_eq!(verdict.warnings.len(), 1);
    }

    #[test]
    fn a_cluster_that_can_lose_acknowledged_hits_warns_or_refuses() {
        let risky = TopicFacts {
            brokers: 3,
            replication: 3,
            min_insync_replicas: Some(1),
            unclean_leader_election: Some(true),
            ..single()
        };
        let warned = judge("t", &risky, MIB, false);
        assert!(warned.fatal.is_empty());
        assert!(warned.warnings[0].contains("min.insync.replicas is 1"));
        assert!(warned.warnings[0].contains("unclean.leader.election.enable is true"));
        let refused = judge("t", &risky, MIB, true);
        assert_eq!(refused.fatal.len(), 1);
        assert!(refused.fatal[0].contains("HOOKPIPE_REQUIRE_DURABLE_TOPIC"));
        let single_copy = TopicFacts {
            replication: 1,
            min_insync_replicas: Some(2),
            unclean_leader_election: Some(false),
            ..risky.clone()
        };
        assert!(judge("t", &single_copy, MIB, true).fatal[0].contains("1 replica(s)"));
        let durable = TopicFacts {
            min_insync_replicas: Some(2),
            unclean_leader_election: Some(false),
            ..risky
        };
        assert_eq!(judge("t", &durable, MIB, true), Verdict::default());
    }
}
