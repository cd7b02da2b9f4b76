package bench;

import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

/** Helper commands: create topics, produce test JSON, count committed records. */
final class Tools {
    private Tools() {}

    /** topics BOOTSTRAP PARTITIONS TOPIC... */
    static void createTopics(String[] a) throws Exception {
        if (a.length < 3) throw new IllegalArgumentException("topics BOOTSTRAP PARTITIONS TOPIC...");
        int partitions = Integer.parseInt(a[1]);
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, a[0]);
        try (Admin admin = Admin.create(p)) {
            for (int i = 2; i < a.length; i++) {
                try {
                    // retention.ms=-1: records carry event-time timestamps (2023 by default), which the
                    // default 7-day time retention would delete soon after they are written.
                    admin.createTopics(List.of(new NewTopic(a[i], partitions, (short) 1)
                        .configs(Map.of("retention.ms", "-1")))).all().get();
                    System.out.println("created " + a[i] + " (" + partitions + " partitions)");
                } catch (ExecutionException e) {
                    if (!(e.getCause() instanceof TopicExistsException)) throw e;
                    System.out.println("exists " + a[i]);
                }
            }
        }
    }

    /**
     * produce BOOTSTRAP TOPIC N [--users U] [--key user|id|none] [--start-id S] [--ts-step-ms T]
     * [--dup-every D] [--ts-base MILLIS|now]. Record i (i from S):
     * {"id":i,"user":"u{i%U}","amount":i%100,"ts":BASE+i*T} with BASE 1700000000000 by default,
     * the same shape as weir's benches/stateful.rs. --dup-every D sends every D-th record twice.
     */
    static void produce(String[] a) throws Exception {
        if (a.length < 3) throw new IllegalArgumentException("produce BOOTSTRAP TOPIC N [options]");
        String bootstrap = a[0], topic = a[1];
        long n = Long.parseLong(a[2]);
        Map<String, String> o = options(a, 3);
        long users = Long.parseLong(o.getOrDefault("users", "1000"));
        String key = o.getOrDefault("key", "user");
        long start = Long.parseLong(o.getOrDefault("start-id", "0"));
        long step = Long.parseLong(o.getOrDefault("ts-step-ms", "10"));
        long dupEvery = Long.parseLong(o.getOrDefault("dup-every", "0"));
        String tsBaseArg = o.getOrDefault("ts-base", "1700000000000");
        long tsBase = tsBaseArg.equals("now") ? System.currentTimeMillis() : Long.parseLong(tsBaseArg);
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.LINGER_MS_CONFIG, "10");
        p.put(ProducerConfig.BATCH_SIZE_CONFIG, String.valueOf(256 * 1024));
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        long t0 = System.nanoTime(), sent = 0;
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(p)) {
            for (long id = start; id < start + n; id++) {
                String user = "u" + (id % users);
                String value = "{\"id\":" + id + ",\"user\":\"" + user + "\",\"amount\":" + (id % 100)
                    + ",\"ts\":" + (tsBase + id * step) + "}";
                String k = switch (key) {
                    case "user" -> user;
                    case "id" -> Long.toString(id);
                    default -> null;
                };
                int copies = dupEvery > 0 && id % dupEvery == 0 ? 2 : 1;
                for (int c = 0; c < copies; c++) {
                    producer.send(new ProducerRecord<>(topic, k, value), (md, e) -> {
                        if (e != null) {
                            e.printStackTrace();
                            System.exit(1);
                        }
                    });
                    sent++;
                }
            }
            producer.flush();
        }
        double s = (System.nanoTime() - t0) / 1e9;
        System.out.printf("produced %d records to %s in %.2f s (%.0f rec/s)%n", sent, topic, s, sent / s);
    }

    /** count BOOTSTRAP TOPIC: records visible to read_committed, from the start to the LSO. */
    static void count(String[] a) {
        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, a[0]);
        boolean uncommitted = a.length > 2 && a[2].equals("--uncommitted");
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, uncommitted ? "read_uncommitted" : "read_committed");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        p.put(ConsumerConfig.MAX_POLL_RECORDS_CONFIG, "10000");
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        try (KafkaConsumer<byte[], byte[]> c = new KafkaConsumer<>(p)) {
            List<TopicPartition> tps = new ArrayList<>();
            for (PartitionInfo pi : c.partitionsFor(a[1])) tps.add(new TopicPartition(pi.topic(), pi.partition()));
            c.assign(tps);
            c.seekToBeginning(tps);
            Map<TopicPartition, Long> end = new HashMap<>(c.endOffsets(tps)); // LSO under read_committed
            long count = 0;
            long deadline = System.currentTimeMillis() + 120_000;
            while (System.currentTimeMillis() < deadline) {
                boolean done = true;
                for (TopicPartition tp : tps) if (c.position(tp) < end.get(tp)) done = false;
                if (done) break;
                ConsumerRecords<byte[], byte[]> rs = c.poll(Duration.ofMillis(500));
                count += rs.count();
            }
            System.out.println(count);
            if (System.getenv("COUNT_VERBOSE") != null) {
                System.err.println("end offsets: " + end + " begin: " + c.beginningOffsets(tps));
            }
        }
    }

    /** --name value pairs (and bare --flag = "true") from index i on. */
    static Map<String, String> options(String[] a, int i) {
        Map<String, String> o = new HashMap<>();
        for (; i < a.length; i++) {
            if (!a[i].startsWith("--")) throw new IllegalArgumentException("unexpected argument: " + a[i]);
            String name = a[i].substring(2);
            if (i + 1 < a.length && !a[i + 1].startsWith("--")) o.put(name, a[++i]);
            else o.put(name, "true");
        }
        return o;
    }
}
