//! The baseline of `benches/kafka_ingest.sh`: a raw librdkafka consumer (rdkafka's
//! `BaseConsumer`, the same bundled librdkafka as tidewatch's `kafka` source) that reads a topic from the start
//! of every partition and counts the messages and bytes, nothing else.
//!
//!   kafka_raw_consume BROKERS TOPIC MESSAGES
//!
//! Prints `consumed N messages (B bytes) in S s: R msg/s`, timed from the assignment to the
//! last message.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(brokers), Some(topic), Some(Ok(expected))) =
        (args.get(1), args.get(2), args.get(3).map(|count| count.parse::<u64>()))
    else {
        eprintln!("usage: kafka_raw_consume BROKERS TOPIC MESSAGES");
        return ExitCode::from(2);
    };
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("kafka-raw-consume-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(consumer) => consumer,
        Err(error) => {
            eprintln!("cannot create the consumer: {error}");
            return ExitCode::FAILURE;
        }
    };
    let metadata = match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
        Ok(metadata) => metadata,
        Err(error) => {
            eprintln!("no metadata for {topic}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|topic| topic.partitions()) {
        if let Err(error) =
            assignment.add_partition_offset(topic, partition.id(), Offset::Beginning)
        {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    }
    drop(metadata);
    if let Err(error) = consumer.assign(&assignment) {
        eprintln!("cannot assign: {error}");
        return ExitCode::FAILURE;
    }
    let start = Instant::now();
    let (mut count, mut bytes) = (0u64, 0u64);
    while count < expected {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                count += 1;
                bytes += message.payload().map_or(0, <[u8]>::len) as u64;
            }
            Some(Err(error)) => eprintln!("{error}"),
            None if start.elapsed() > Duration::from_secs(300) => {
                eprintln!("only {count} of {expected} messages within 300 s");
                return ExitCode::FAILURE;
            }
            None => {}
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "consumed {count} messages ({bytes} bytes) in {secs:.3} s: {:.0} msg/s",
        count as f64 / secs
    );
    drop(assignment);
    ExitCode::SUCCESS
}
