"""What happens to a call on its way out of Kafka: its waits, its deadline, its order."""
