"""The Kafka consumers: the order saga, the order-events publisher, the payment simulator."""
