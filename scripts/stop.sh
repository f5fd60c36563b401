#!/usr/bin/env bash
# Stops every private cluster of this checkout (demo, regress, bench, tests), by data directory.
. "$(dirname "$0")/lib.sh"
stop_all_clusters
