# The two commands of the README. Both build the Python environment on first use
# (scripts/dev-env) and start the local Kafka broker (deploy/kafka/broker.sh).
.PHONY: demo test broker-stop

demo:
	bash deploy/kafka/broker.sh start
	scripts/dev-env vql demo

test:
	bash deploy/kafka/broker.sh start
	scripts/dev-env python -m pytest -v -rfEsP

broker-stop:
	bash deploy/kafka/broker.sh stop
