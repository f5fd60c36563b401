# The two commands README opens with, and a few more.
.PHONY: demo test bench stop
demo:
	scripts/demo.sh
test:
	scripts/test.sh
bench:
	bench/reserve.sh
stop:
	scripts/stop.sh
