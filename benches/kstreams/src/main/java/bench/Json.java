package bench;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serializer;
import org.apache.kafka.streams.processor.TimestampExtractor;

/** Jackson JsonNode serde and the event-time extractor (field "ts", epoch millis). */
public final class Json {
    public static final ObjectMapper MAPPER = new ObjectMapper();

    private Json() {}

    public static final class NodeSerializer implements Serializer<JsonNode> {
        @Override
        public byte[] serialize(String topic, JsonNode data) {
            if (data == null) return null;
            try {
                return MAPPER.writeValueAsBytes(data);
            } catch (IOException e) {
                throw new SerializationException(e);
            }
        }
    }

    public static final class NodeDeserializer implements Deserializer<JsonNode> {
        @Override
        public JsonNode deserialize(String topic, byte[] data) {
            if (data == null) return null;
            try {
                return MAPPER.readTree(data);
            } catch (IOException e) {
                throw new SerializationException(e);
            }
        }
    }

    /** Usable as default.value.serde too (public no-arg constructor). */
    public static final class NodeSerde implements Serde<JsonNode> {
        @Override
        public Serializer<JsonNode> serializer() {
            return new NodeSerializer();
        }

        @Override
        public Deserializer<JsonNode> deserializer() {
            return new NodeDeserializer();
        }
    }

    /**
     * Event time from the value's "ts" field. Streams hands the extractor the already
     * deserialized record, so the JSON is parsed once per record. A record without a usable ts
     * falls back to the previous partition time (or the broker timestamp).
     */
    public static final class TsExtractor implements TimestampExtractor {
        @Override
        public long extract(ConsumerRecord<Object, Object> record, long partitionTime) {
            if (record.value() instanceof JsonNode node) {
                JsonNode ts = node.get("ts");
                if (ts != null && ts.canConvertToLong()) return ts.asLong();
            }
            return partitionTime >= 0 ? partitionTime : record.timestamp();
        }
    }
}
