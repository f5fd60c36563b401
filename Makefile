# The two commands README opens with, and a few more.
.PHONY: demo test package test-packages bench bench-members bench-worker bench-trust bench-record bench-litellm bench-peers soak stop
demo:
	scripts/demo.sh
test:
	scripts/test.sh
package:
	scripts/package.sh
test-packages:
	scripts/test-packages.sh
bench:
	bench/reserve.sh
bench-members:
	bench/members.sh
bench-worker:
	bench/worker.sh
bench-trust:
	bench/trust.sh
bench-record:
	bench/record.sh
bench-litellm:
	bench/vs-litellm.sh
bench-peers:
	bench/vs-peers.sh
soak:
	bench/soak.sh
stop:
	scripts/stop.sh
