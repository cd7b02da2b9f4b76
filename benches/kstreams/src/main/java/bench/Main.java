package bench;

import java.util.Arrays;

/**
 * Entry point. Subcommands:
 *
 * <pre>
 *   topics  BOOTSTRAP PARTITIONS TOPIC...                 create topics (RF 1; existing ones are kept)
 *   produce BOOTSTRAP TOPIC N [--users 1000] [--key user|id|none] [--start-id 0]
 *                             [--ts-step-ms 10] [--dup-every 0] [--ts-base 1700000000000|now]
 *   count   BOOTSTRAP TOPIC                               read_committed record count up to the LSO
 *   run     BOOTSTRAP WORKLOAD INPUTS OUTPUT APP_ID [options]   (see StreamsBench)
 * </pre>
 *
 * "run" may be omitted: "BOOTSTRAP WORKLOAD INPUTS OUTPUT APP_ID ..." is the same.
 */
public final class Main {
    public static void main(String[] args) throws Exception {
        // slf4j-simple logs INFO by default, which is very chatty for Kafka clients.
        if (System.getProperty("org.slf4j.simpleLogger.defaultLogLevel") == null) {
            System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
        }
        System.setProperty("org.slf4j.simpleLogger.showDateTime", "true");
        if (args.length == 0) {
            usage();
            System.exit(2);
        }
        String[] rest = Arrays.copyOfRange(args, 1, args.length);
        switch (args[0]) {
            case "topics" -> Tools.createTopics(rest);
            case "produce" -> Tools.produce(rest);
            case "count" -> Tools.count(rest);
            case "run" -> System.exit(StreamsBench.run(rest));
            case "-h", "--help", "help" -> usage();
            default -> System.exit(StreamsBench.run(args));
        }
    }

    static void usage() {
        System.err.println("""
            usage:
              topics  BOOTSTRAP PARTITIONS TOPIC...
              produce BOOTSTRAP TOPIC N [--users 1000] [--key user|id|none] [--start-id 0] [--ts-step-ms 10] [--dup-every 0] [--ts-base 1700000000000|now]
              count   BOOTSTRAP TOPIC
              run     BOOTSTRAP WORKLOAD INPUTS OUTPUT APP_ID [--expect N] [--idle-sec 10] [--threads 1]
                      [--state-dir DIR] [--rekey] [--join-key FIELD] [--join-window-ms 1000] [--join-grace-ms 1000]
                      [--timeout-sec 600]
              WORKLOAD: passthrough | dedup | window | join   (join: INPUTS = LEFT,RIGHT)""");
    }
}
