package bench;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.lang.management.ManagementFactory;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.GlobalKTable;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.JoinWindows;
import org.apache.kafka.streams.kstream.KStream;
import org.apache.kafka.streams.kstream.KGroupedStream;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.kstream.Repartitioned;
import org.apache.kafka.streams.kstream.StreamJoined;
import org.apache.kafka.streams.kstream.Suppressed;
import org.apache.kafka.streams.kstream.TimeWindows;
import org.apache.kafka.streams.processor.api.FixedKeyProcessor;
import org.apache.kafka.streams.processor.api.FixedKeyProcessorContext;
import org.apache.kafka.streams.processor.api.FixedKeyRecord;
import org.apache.kafka.streams.state.Stores;
import org.apache.kafka.streams.state.WindowStore;
import org.apache.kafka.streams.state.WindowStoreIterator;

/**
 * run BOOTSTRAP WORKLOAD INPUTS OUTPUT APP_ID [options]
 *
 * <p>Workloads (input values are JSON like {"id":1,"user":"u1","amount":7,"ts":1700000000000},
 * event time = ts):
 *
 * <ul>
 *   <li>passthrough: values parsed with Jackson and written back unchanged.
 *   <li>dedup: drop a record if its --dedup-fields (default user,id) were seen within 24h of event
 *       time (RocksDB window store, eviction by the store's segment retention, no punctuation).
 *   <li>window: count per --group-field (default user) in --window-ms windows (default 1000)
 *       advancing by --advance-ms (default: tumbling), grace --grace-ms (default 1000),
 *       suppress(untilWindowCloses), output {GROUP,"window_start","window_end",COUNT} keyed by
 *       the group, COUNT named by --count-field (default count).
 *   <li>enrich: INPUTS=STREAM,TABLE; each record joined with the row of a GlobalKTable under
 *       key id % --table-size (default 1000000), output the record plus "account" and
 *       "accounts" (the row).
 *   <li>join: INPUTS=LEFT,RIGHT; inner KStream-KStream join, JoinWindows.ofTimeDifferenceAndGrace
 *       (--join-window-ms, --join-grace-ms, and --join-before-ms to narrow how far the right
 *       record may precede the left), output {LEFT_NAME:...,RIGHT_NAME:...} (--left-name,
 *       --right-name, default left and right).
 * </ul>
 *
 * <p>Keys: by default the input is assumed keyed by the grouping/join key (the producer keys by
 * user), so no repartition topic is used. --rekey re-keys by user (dedup/window) and goes through
 * a repartition topic; --join-key FIELD re-keys both join sides by FIELD (repartition).
 *
 * <p>End: the process closes (committing) once --expect N input records have been read, or
 * --idle-sec X seconds after the last input record (default 10), or at --timeout-sec.
 */
final class StreamsBench {
    static final AtomicLong IN = new AtomicLong();
    static final AtomicLong OUT = new AtomicLong();
    static final AtomicLong DROPPED = new AtomicLong();
    static volatile long firstInNanos = 0;
    static volatile long lastInNanos = 0;

    private StreamsBench() {}

    static int run(String[] a) throws Exception {
        if (a.length < 5) {
            Main.usage();
            return 2;
        }
        long t0 = System.nanoTime();
        double cpu0 = cpuSeconds();
        String bootstrap = a[0], workload = a[1], output = a[3], appId = a[4];
        String[] inputs = a[2].split(",");
        Map<String, String> o = Tools.options(a, 5);
        long expect = Long.parseLong(o.getOrDefault("expect", "0"));
        double idleSec = Double.parseDouble(o.getOrDefault("idle-sec", "10"));
        double timeoutSec = Double.parseDouble(o.getOrDefault("timeout-sec", "600"));
        int threads = Integer.parseInt(o.getOrDefault("threads", "1"));
        boolean rekey = o.containsKey("rekey");
        Path stateDir = Path.of(o.getOrDefault("state-dir", "/tmp/kstreams-bench/state"));
        Files.createDirectories(stateDir);

        Topology topology = build(workload, inputs, output, rekey, o);

        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, appId);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, 100);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, threads);
        p.put(StreamsConfig.STATE_DIR_CONFIG, stateDir.toString());
        p.put(StreamsConfig.DEFAULT_KEY_SERDE_CLASS_CONFIG, Serdes.StringSerde.class);
        p.put(StreamsConfig.DEFAULT_VALUE_SERDE_CLASS_CONFIG, Json.NodeSerde.class);
        // Single broker: internal topics (changelogs, repartition) with RF 1.
        p.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, 1);
        // Any other StreamsConfig/consumer/producer setting: -Dks.NAME=VALUE on the java command line.
        for (String name : System.getProperties().stringPropertyNames()) {
            if (name.startsWith("ks.")) p.put(name.substring(3), System.getProperty(name));
        }

        KafkaStreams streams = new KafkaStreams(topology, p);
        final long[] runningNanos = {0};
        final boolean[] failed = {false};
        streams.setStateListener((now, before) -> {
            log(t0, "state " + before + " -> " + now);
            if (now == KafkaStreams.State.RUNNING && runningNanos[0] == 0) runningNanos[0] = System.nanoTime();
            if (now == KafkaStreams.State.ERROR) failed[0] = true;
        });
        streams.setUncaughtExceptionHandler(e -> {
            e.printStackTrace();
            failed[0] = true;
            return org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse
                .SHUTDOWN_CLIENT;
        });
        log(t0, "starting " + workload + " " + String.join(",", inputs) + " -> " + output + " app.id=" + appId);
        streams.start();
        double cpuRunning = 0;
        String why;
        while (true) {
            Thread.sleep(50);
            long now = System.nanoTime();
            if (runningNanos[0] != 0 && cpuRunning == 0) cpuRunning = cpuSeconds();
            if (failed[0] || streams.state() == KafkaStreams.State.ERROR
                || streams.state() == KafkaStreams.State.NOT_RUNNING) {
                why = "failed";
                break;
            }
            if (expect > 0 && IN.get() >= expect) {
                why = "expected input read";
                break;
            }
            if (idleSec > 0 && lastInNanos != 0 && (now - lastInNanos) / 1e9 >= idleSec) {
                why = "idle " + idleSec + " s";
                break;
            }
            if ((now - t0) / 1e9 >= timeoutSec) {
                why = "timeout";
                break;
            }
        }
        log(t0, "stopping: " + why + "; closing (commits the open transaction)");
        if (System.getenv("BENCH_THREAD_CPU") != null) threadCpu();
        long closeStart = System.nanoTime();
        boolean closed = streams.close(Duration.ofSeconds(60));
        long end = System.nanoTime();
        double cpuEnd = cpuSeconds();
        long in = IN.get(), out = OUT.get();
        double procSec = firstInNanos == 0 ? 0 : (end - firstInNanos) / 1e9;
        double runSec = runningNanos[0] == 0 ? 0 : (end - runningNanos[0]) / 1e9;
        double lastSec = firstInNanos == 0 ? 0 : (lastInNanos - firstInNanos) / 1e9;
        System.out.printf(
            "RESULT workload=%s in=%d out=%d dropped=%d end=\"%s\" closed=%s startup_to_running_s=%.2f "
                + "first_in_to_closed_s=%.2f running_to_closed_s=%.2f first_to_last_in_s=%.2f close_s=%.2f "
                + "rate_first_in_to_closed=%.0f rate_running_to_closed=%.0f cpu_total_s=%.2f cpu_since_running_s=%.2f "
                + "wall_since_jvm_start_s=%.2f%n",
            workload, in, out, DROPPED.get(), why, closed,
            runningNanos[0] == 0 ? -1 : (runningNanos[0] - t0) / 1e9,
            procSec, runSec, lastSec, (end - closeStart) / 1e9,
            procSec > 0 ? in / procSec : 0, runSec > 0 ? in / runSec : 0,
            cpuEnd, cpuEnd - cpuRunning, sinceJvmStartSec());
        return failed[0] || !closed ? 1 : 0;
    }

    /** Per-thread CPU (all JVM threads, incl. JIT and GC) from /proc/self/task, summed by name. */
    static void threadCpu() {
        Map<String, Double> byName = new java.util.TreeMap<>();
        try (var tasks = Files.list(Path.of("/proc/self/task"))) {
            for (Path t : (Iterable<Path>) tasks::iterator) {
                try {
                    String s = Files.readString(t.resolve("stat"));
                    String name = s.substring(s.indexOf('(') + 1, s.lastIndexOf(')')).replaceAll("[0-9]+", "#");
                    String[] f = s.substring(s.lastIndexOf(')') + 2).split(" ");
                    byName.merge(name, (Long.parseLong(f[11]) + Long.parseLong(f[12])) / 100.0, Double::sum);
                } catch (Exception ignored) {
                    // thread gone
                }
            }
        } catch (Exception e) {
            return;
        }
        byName.entrySet().stream().filter(e -> e.getValue() >= 0.05)
            .sorted((x, y) -> Double.compare(y.getValue(), x.getValue()))
            .forEach(e -> System.err.printf("  thread-cpu %-28s %6.2f s%n", e.getKey(), e.getValue()));
    }

    static Topology build(String workload, String[] inputs, String output, boolean rekey, Map<String, String> o) {
        Serde<String> ks = Serdes.String();
        Serde<JsonNode> vs = new Json.NodeSerde();
        Consumed<String, JsonNode> consumed = Consumed.with(ks, vs).withTimestampExtractor(new Json.TsExtractor());
        Produced<String, JsonNode> produced = Produced.with(ks, vs);
        StreamsBuilder b = new StreamsBuilder();
        switch (workload) {
            case "passthrough" -> {
                KStream<String, JsonNode> s = source(b, inputs[0], consumed);
                s.mapValues(v -> v).peek((k, v) -> OUT.incrementAndGet()).to(output, produced);
            }
            case "dedup" -> {
                KStream<String, JsonNode> s = source(b, inputs[0], consumed);
                if (rekey) {
                    s = s.selectKey((k, v) -> v.path("user").asText())
                        .repartition(Repartitioned.with(ks, vs).withName("by-user"));
                }
                b.addStateStore(Stores.windowStoreBuilder(
                    Stores.persistentWindowStore(Dedup.STORE, Dedup.WITHIN, Dedup.WITHIN, false), ks, Serdes.Long()));
                String[] fields = o.getOrDefault("dedup-fields", "user,id").split(",");
                s.processValues(() -> new Dedup(fields), Dedup.STORE)
                    .peek((k, v) -> OUT.incrementAndGet()).to(output, produced);
            }
            case "window" -> {
                KStream<String, JsonNode> s = source(b, inputs[0], consumed);
                String group = o.getOrDefault("group-field", "user");
                String countField = o.getOrDefault("count-field", "count");
                long size = Long.parseLong(o.getOrDefault("window-ms", "1000"));
                long advance = Long.parseLong(o.getOrDefault("advance-ms", String.valueOf(size)));
                long windowGrace = Long.parseLong(o.getOrDefault("grace-ms", "1000"));
                KGroupedStream<String, JsonNode> g = rekey
                    ? s.groupBy((k, v) -> v.path(group).asText(), Grouped.with("by-" + group, ks, vs))
                    : s.groupByKey(Grouped.with(ks, vs));
                g.windowedBy(TimeWindows.ofSizeAndGrace(Duration.ofMillis(size), Duration.ofMillis(windowGrace))
                        .advanceBy(Duration.ofMillis(advance)))
                    .count(Materialized.as("counts"))
                    .suppress(Suppressed.untilWindowCloses(Suppressed.BufferConfig.unbounded()))
                    .toStream()
                    .map((wk, count) -> {
                        ObjectNode n = Json.MAPPER.createObjectNode();
                        n.put(group, wk.key());
                        n.put("window_start", wk.window().start());
                        n.put("window_end", wk.window().end());
                        n.put(countField, count);
                        return KeyValue.pair(wk.key(), (JsonNode) n);
                    })
                    .peek((k, v) -> OUT.incrementAndGet())
                    .to(output, produced);
            }
            case "aggregate" -> {
                // A running count and sum per group, without windows: groupByKey().aggregate(),
                // its updates leaving through the record cache at each commit.
                KStream<String, JsonNode> s = source(b, inputs[0], consumed);
                String group = o.getOrDefault("group-field", "user");
                String sumField = o.getOrDefault("sum-field", "price");
                KGroupedStream<String, JsonNode> g = rekey
                    ? s.groupBy((k, v) -> v.path(group).asText(), Grouped.with("by-" + group, ks, vs))
                    : s.groupByKey(Grouped.with(ks, vs));
                g.aggregate(
                        () -> (JsonNode) Json.MAPPER.createObjectNode(),
                        (k, v, total) -> {
                            ObjectNode n = Json.MAPPER.createObjectNode();
                            n.put(group, v.path(group).asLong());
                            n.put("bids", total.path("bids").asLong() + 1);
                            n.put("total", total.path("total").asLong() + v.path(sumField).asLong());
                            return (JsonNode) n;
                        },
                        Materialized.<String, JsonNode, org.apache.kafka.streams.state.KeyValueStore<org.apache.kafka.common.utils.Bytes, byte[]>>as("totals")
                            .withKeySerde(ks).withValueSerde(vs))
                    .toStream()
                    .peek((k, v) -> OUT.incrementAndGet())
                    .to(output, produced);
            }
            case "enrich" -> {
                // INPUTS=STREAM,TABLE: each record joined with the row of account id % --table-size
                // from a GlobalKTable (every instance reads the whole table into RocksDB first).
                if (inputs.length != 2) throw new IllegalArgumentException("enrich needs INPUTS=STREAM,TABLE");
                KStream<String, JsonNode> s = source(b, inputs[0], consumed);
                long tableSize = Long.parseLong(o.getOrDefault("table-size", "1000000"));
                GlobalKTable<String, JsonNode> accounts = b.globalTable(inputs[1], Consumed.with(ks, vs),
                    Materialized.<String, JsonNode, org.apache.kafka.streams.state.KeyValueStore<org.apache.kafka.common.utils.Bytes, byte[]>>as("accounts")
                        .withKeySerde(ks).withValueSerde(vs));
                s.join(accounts,
                        (k, v) -> String.valueOf(v.path("id").asLong() % tableSize),
                        (v, row) -> {
                            ObjectNode n = v.deepCopy();
                            n.put("account", v.path("id").asLong() % tableSize);
                            n.set("accounts", row);
                            return (JsonNode) n;
                        })
                    .peek((k, v) -> OUT.incrementAndGet())
                    .to(output, produced);
            }
            case "join" -> {
                if (inputs.length != 2) throw new IllegalArgumentException("join needs INPUTS=LEFT,RIGHT");
                KStream<String, JsonNode> left = source(b, inputs[0], consumed);
                KStream<String, JsonNode> right = source(b, inputs[1], consumed);
                String field = o.get("join-key");
                if (field != null) {
                    left = left.selectKey((k, v) -> v.path(field).asText());
                    right = right.selectKey((k, v) -> v.path(field).asText());
                }
                long win = Long.parseLong(o.getOrDefault("join-window-ms", "1000"));
                long grace = Long.parseLong(o.getOrDefault("join-grace-ms", "1000"));
                String leftName = o.getOrDefault("left-name", "left");
                String rightName = o.getOrDefault("right-name", "right");
                JoinWindows windows = JoinWindows.ofTimeDifferenceAndGrace(Duration.ofMillis(win), Duration.ofMillis(grace));
                // --join-before-ms: how far the right record may precede the left (default: the window).
                if (o.containsKey("join-before-ms")) {
                    windows = windows.before(Duration.ofMillis(Long.parseLong(o.get("join-before-ms"))));
                }
                left.join(right, (l, r) -> {
                            ObjectNode n = Json.MAPPER.createObjectNode();
                            n.set(leftName, l);
                            n.set(rightName, r);
                            return (JsonNode) n;
                        },
                        windows,
                        StreamJoined.with(ks, vs, vs).withStoreName("join"))
                    .peek((k, v) -> OUT.incrementAndGet())
                    .to(output, produced);
            }
            default -> throw new IllegalArgumentException("unknown workload " + workload);
        }
        return b.build();
    }

    static KStream<String, JsonNode> source(StreamsBuilder b, String topic, Consumed<String, JsonNode> consumed) {
        return b.stream(topic, consumed).peek((k, v) -> {
            long now = System.nanoTime();
            if (IN.getAndIncrement() == 0) firstInNanos = now;
            lastInNanos = now;
        });
    }

    /** Drops a record whose key fields were seen within WITHIN of its event time. */
    static final class Dedup implements FixedKeyProcessor<String, JsonNode, JsonNode> {
        static final String STORE = "dedup-store";
        static final Duration WITHIN = Duration.ofHours(24);
        private final String[] fields;
        private FixedKeyProcessorContext<String, JsonNode> ctx;
        private WindowStore<String, Long> store;

        Dedup(String[] fields) {
            this.fields = fields;
        }

        @Override
        public void init(FixedKeyProcessorContext<String, JsonNode> context) {
            ctx = context;
            store = context.getStateStore(STORE);
        }

        @Override
        public void process(FixedKeyRecord<String, JsonNode> r) {
            JsonNode v = r.value();
            StringBuilder key = new StringBuilder();
            for (String field : fields) key.append(v.path(field).asText()).append('|');
            long ts = r.timestamp();
            long within = WITHIN.toMillis();
            try (WindowStoreIterator<Long> it = store.fetch(key.toString(), ts - within, ts + within)) {
                if (it.hasNext()) {
                    DROPPED.incrementAndGet();
                    return;
                }
            }
            store.put(key.toString(), ts, ts);
            ctx.forward(r);
        }
    }

    /** utime+stime of this process from /proc/self/stat, in seconds (CLK_TCK assumed 100). */
    static double cpuSeconds() {
        try {
            String s = Files.readString(Path.of("/proc/self/stat"));
            String[] f = s.substring(s.lastIndexOf(')') + 2).split(" ");
            // f[0] is field 3 (state); utime = field 14, stime = field 15
            return (Long.parseLong(f[11]) + Long.parseLong(f[12])) / 100.0;
        } catch (Exception e) {
            return -1;
        }
    }

    /** Seconds from JVM start (RuntimeMXBean) to now. */
    static double sinceJvmStartSec() {
        return (System.currentTimeMillis() - ManagementFactory.getRuntimeMXBean().getStartTime()) / 1000.0;
    }

    static void log(long t0, String msg) {
        System.err.printf("[%7.2fs] %s%n", (System.nanoTime() - t0) / 1e9, msg);
    }
}
