"""Sources: where encoded spans and logs come from (files now; OTLP and Kafka next)."""
