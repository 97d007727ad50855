#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, broker and controller in one JVM) on
# 127.0.0.1, run from the Maven Central jars that deploy/kafka/pom.xml names.
#
# Why this exists: the integration tests need a real broker, and some machines (CI, the
# developers' boxes) have Java but no Docker engine. Kafka is plain Java, so the jars from
# Maven Central plus a generated server.properties are all it takes.
#
# Usage: deploy/kafka/broker.sh {fetch|start|wait|stop|status|logs|reset}
#   fetch   download the broker jars into $VQL_KAFKA_HOME once (needs mvn)
#   start   fetch if needed, format storage on first use, start in the background, wait
#           until it answers; a second start while it runs only says so
#   wait    wait until the running broker answers (exit 1 on timeout or if it died)
#   stop    SIGTERM, then SIGKILL after $VQL_KAFKA_STOP_TIMEOUT s; fine when none runs
#   status  exit 0: running and answering; 1: running, not answering; 3: not running
#   logs    print the path of the broker's log file
#   reset   stop, then delete the state dir (topics, offsets, logs)
#
# Knobs (environment, with defaults):
#   VQL_KAFKA_HOME            jar cache    ${XDG_CACHE_HOME:-$HOME/.cache}/vql-stream/kafka-3.9.1
#   VQL_KAFKA_STATE           state dir    ${XDG_CACHE_HOME:-$HOME/.cache}/vql-stream/broker
#   VQL_KAFKA_PORT            client port  9092  (bootstrap: 127.0.0.1:$VQL_KAFKA_PORT)
#   VQL_KAFKA_CONTROLLER_PORT KRaft port   9093
#   VQL_KAFKA_HEAP            JVM heap     -Xmx512m -Xms512m
#   VQL_KAFKA_JVM_OPTS        more JVM flags (appended)
#   VQL_KAFKA_WAIT_TIMEOUT    seconds start/wait allow for readiness   90
#   VQL_KAFKA_STOP_TIMEOUT    seconds stop allows before SIGKILL       30
#   JAVA_HOME                 used when set, else `java` on PATH
#
# An opt-in SASL_SSL listener (off unless VQL_KAFKA_SASL_SSL_PORT is set), beside PLAINTEXT:
#   VQL_KAFKA_SASL_SSL_PORT   its port (advertised as 127.0.0.1:$VQL_KAFKA_SASL_SSL_PORT)
#   VQL_KAFKA_SASL_USERS      user:password[,user:password...]   vql:vql-secret
#                             PLAIN users go into the listener's JAAS config; SCRAM-SHA-256 and
#                             SCRAM-SHA-512 credentials are written when the storage is first
#                             formatted (kafka-storage format --add-scram): reset to change them
#   VQL_KAFKA_TLS_DIR         certificates  $VQL_KAFKA_STATE/tls
#                             made on first start with openssl: a CA (ca.pem: what clients
#                             trust, VQL_KAFKA_SSL_CAFILE) and the broker's certificate for
#                             127.0.0.1 and localhost, signed by it, in a PKCS12 keystore
#
# Linux only (setsid, flock, /proc); the state dir and jar cache live outside the repo.
set -euo pipefail

readonly KAFKA_VERSION=3.9.1 # keep in step with <kafka.version> in pom.xml
readonly NODE_ID=1
readonly HOST=127.0.0.1

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly POM="$SCRIPT_DIR/pom.xml"

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/vql-stream"
KAFKA_HOME="${VQL_KAFKA_HOME:-$CACHE_ROOT/kafka-$KAFKA_VERSION}"
STATE="${VQL_KAFKA_STATE:-$CACHE_ROOT/broker}"
PORT="${VQL_KAFKA_PORT:-9092}"
CONTROLLER_PORT="${VQL_KAFKA_CONTROLLER_PORT:-9093}"
HEAP="${VQL_KAFKA_HEAP:--Xmx512m -Xms512m}"
JVM_OPTS="${VQL_KAFKA_JVM_OPTS:-}"
WAIT_TIMEOUT="${VQL_KAFKA_WAIT_TIMEOUT:-90}"
STOP_TIMEOUT="${VQL_KAFKA_STOP_TIMEOUT:-30}"
SASL_SSL_PORT="${VQL_KAFKA_SASL_SSL_PORT:-}"
SASL_USERS="${VQL_KAFKA_SASL_USERS:-vql:vql-secret}"
TLS_DIR="${VQL_KAFKA_TLS_DIR:-$STATE/tls}"

LIB="$KAFKA_HOME/lib"
# Written only after a complete copy: a half-finished download never looks usable.
# It holds the pom's checksum, so editing the pom (say, a new Kafka version) refetches.
FETCH_MARKER="$LIB/.complete"
DATA="$STATE/data"
LOG="$STATE/broker.log"
PID_FILE="$STATE/broker.pid"
PROPS="$STATE/server.properties"
LOG4J="$STATE/log4j.properties"
# reset deletes a directory: only one that this script made (it holds this file).
STATE_MARK="$STATE/.vql-kafka-state"

if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then JAVA="$JAVA_HOME/bin/java"; else JAVA=java; fi

say() { printf 'broker.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# ---------------------------------------------------------------------------- fetch

jars_complete() {
  [[ -f "$FETCH_MARKER" ]] && [[ "$(cat "$FETCH_MARKER")" == "$(sha256sum "$POM" | cut -d' ' -f1)" ]]
}

cmd_fetch() { # [quiet]
  if jars_complete; then
    [[ -n "${1:-}" ]] || say "jars already in $LIB"
    return 0
  fi
  command -v mvn >/dev/null || die "the Kafka jars are not in $LIB and mvn (Maven) is not installed to fetch them"
  mkdir -p "$KAFKA_HOME"
  # Copy into a scratch dir beside the cache and swap it in, so an interrupted fetch
  # leaves either the old complete lib/ or nothing, never a partial one.
  local tmp
  tmp=$(mktemp -d "$KAFKA_HOME/.fetch.XXXXXX")
  say "fetching Kafka $KAFKA_VERSION jars with Maven into $LIB ..."
  if ! mvn -q -B -f "$POM" dependency:copy-dependencies -DoutputDirectory="$tmp/lib" >"$tmp/mvn.log" 2>&1; then
    cat "$tmp/mvn.log" >&2
    rm -rf "$tmp"
    die "mvn could not fetch the jars (see above)"
  fi
  compgen -G "$tmp/lib/kafka_2.13-*.jar" >/dev/null || { rm -rf "$tmp"; die "mvn ran but no kafka_2.13 jar came back"; }
  rm -rf "$LIB"
  mv "$tmp/lib" "$LIB"
  rm -rf "$tmp"
  sha256sum "$POM" | cut -d' ' -f1 >"$FETCH_MARKER"
  say "jars ready in $LIB"
}

# ---------------------------------------------------------------------------- probes

# The pid of the broker this script started, if it is still alive; else nothing, exit 1.
# The command line is checked too, so a stale pid file whose number the kernel has since
# given to another process is not mistaken for the broker.
broker_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid=$(<"$PID_FILE")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  local cmdline
  cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  [[ "$cmdline" == *"kafka.Kafka $PROPS"* ]] || return 1
  echo "$pid"
}

port_open() { # port -> exit 0 if something accepts TCP connections on it
  timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# Sends a Kafka Metadata request (v0, the simplest encoding) and checks that the reply
# names our node. An open port alone is not enough: the broker binds its socket before
# it serves requests, and a reply proves the request path works end to end.
#   request : size=17 | api_key=3 (Metadata) | api_version=0 | correlation_id=0x5651 |
#             client_id="vql" | topics=[] (empty = all topics)
#   reply   : size | correlation_id | broker count | first broker's node_id | ...
answers_metadata() {
  local head
  head=$(timeout 5 bash -c "
    exec 3<>/dev/tcp/$HOST/$PORT || exit 1
    printf '\x00\x00\x00\x11\x00\x03\x00\x00\x00\x00\x56\x51\x00\x03vql\x00\x00\x00\x00' >&3
    head -c 16 <&3 | od -An -tx1 | tr -d ' \n'
  " 2>/dev/null) || return 1
  # bytes 4-7: our correlation id; 8-11: at least one broker (any count > 0); 12-15: node id
  [[ "${head:8:8}" == "00005651" && "${head:16:8}" != "00000000" && "${head:24:8}" == "$(printf '%08x' "$NODE_ID")" ]]
}

started_in_log() { [[ -f "$LOG" ]] && grep -q "Kafka Server started" "$LOG"; }

ready() { started_in_log && answers_metadata; }

# ---------------------------------------------------------------------------- wait

wait_ready() { # timeout_seconds
  local deadline=$((SECONDS + $1))
  while :; do
    if ! broker_pid >/dev/null; then
      say "the broker is not running; last lines of $LOG:"
      tail -n 30 "$LOG" >&2 2>/dev/null || true
      return 1
    fi
    if ready; then return 0; fi
    if ((SECONDS >= deadline)); then
      say "the broker did not answer within $1 s; last lines of $LOG:"
      tail -n 30 "$LOG" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.5
  done
}

cmd_wait() {
  broker_pid >/dev/null || die "no broker is running (start it with: $0 start)"
  local t0=$SECONDS
  wait_ready "${1:-$WAIT_TIMEOUT}" || exit 1
  say "ready on $HOST:$PORT after $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------- SASL_SSL

# The users as "name password" lines (letters, digits and ._- in names; also ~!@#%^*+ in
# passwords: nothing that would need quoting in JAAS or in StorageTool's --add-scram).
sasl_users() {
  local pair pairs re='^[A-Za-z0-9._-]+:[A-Za-z0-9._~!@#%^*+-]+$'
  IFS=',' read -ra pairs <<<"$SASL_USERS"
  for pair in "${pairs[@]}"; do
    [[ "$pair" =~ $re ]] || die "VQL_KAFKA_SASL_USERS: '$pair' is not user:password"
    echo "${pair%%:*} ${pair#*:}"
  done
}

# A CA and a broker certificate signed by it, made once per TLS dir. The keystore password
# is random and kept beside it (the dir is the broker's own; clients need only ca.pem).
make_certs() {
  [[ -f "$TLS_DIR/broker.p12" && -f "$TLS_DIR/ca.pem" ]] && return 0
  command -v openssl >/dev/null || die "openssl is needed to make the SASL_SSL listener's certificates"
  mkdir -p "$TLS_DIR"
  local t="$TLS_DIR"
  say "making a CA and a broker certificate in $t"
  {
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vql-stream local CA" \
      -keyout "$t/ca.key" -out "$t/ca.pem"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$HOST" -keyout "$t/broker.key" -out "$t/broker.csr"
    printf 'subjectAltName=IP:%s,DNS:localhost\nextendedKeyUsage=serverAuth\n' "$HOST" >"$t/broker.ext"
    openssl x509 -req -in "$t/broker.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial -days 3650 \
      -extfile "$t/broker.ext" -out "$t/broker.pem"
    openssl rand -hex 16 >"$t/keystore.password"
    openssl pkcs12 -export -in "$t/broker.pem" -inkey "$t/broker.key" -certfile "$t/ca.pem" -name broker \
      -passout "file:$t/keystore.password" -out "$t/broker.p12.tmp"
  } >"$t/openssl.log" 2>&1 || { cat "$t/openssl.log" >&2; die "making the certificates failed"; }
  mv "$t/broker.p12.tmp" "$t/broker.p12"
}

# server.properties lines of the SASL_SSL listener (PLAIN and both SCRAM mechanisms).
sasl_ssl_configs() {
  local plain="org.apache.kafka.common.security.plain.PlainLoginModule required"
  local name password
  while read -r name password; do plain+=" user_$name=\"$password\""; done < <(sasl_users)
  cat <<EOF

# The opt-in SASL_SSL listener (VQL_KAFKA_SASL_SSL_PORT): TLS with the certificate of
# $TLS_DIR, users by PLAIN (below) or SCRAM (written at format time).
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$TLS_DIR/broker.p12
listener.name.sasl_ssl.ssl.keystore.password=$(<"$TLS_DIR/keystore.password")
listener.name.sasl_ssl.plain.sasl.jaas.config=$plain;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
}

# StorageTool arguments that write every user's SCRAM credentials into the new cluster.
scram_format_args() {
  [[ -n "$SASL_SSL_PORT" ]] || return 0
  local name password mechanism
  while read -r name password; do
    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
      printf '%s\n' --add-scram "$mechanism=[name=$name,password=$password]"
    done
  done < <(sasl_users)
}

# ---------------------------------------------------------------------------- start

write_configs() {
  local listeners="PLAINTEXT://$HOST:$PORT" protocols="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
  if [[ -n "$SASL_SSL_PORT" ]]; then
    listeners+=",SASL_SSL://$HOST:$SASL_SSL_PORT"
    protocols+=",SASL_SSL:SASL_SSL"
  fi
  # Rewritten on every start so that the knobs (ports) take effect; the data stays.
  cat >"$PROPS" <<EOF
# Generated by deploy/kafka/broker.sh on every start: edit the script, not this file.
# One JVM is both the KRaft controller and the broker.
process.roles=broker,controller
node.id=$NODE_ID
controller.quorum.voters=$NODE_ID@$HOST:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=$listeners,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=$listeners
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocols
log.dirs=$DATA

# One node: every internal topic must be satisfied by a single replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
# The defaults (50 partitions each) make the first consumer group or transaction wait
# while 50 partitions are created; one is plenty for tests and much faster here.
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1

# Tests: no 3 s wait before the first rebalance, topics appear on first use.
group.initial.rebalance.delay.ms=0
num.partitions=1
auto.create.topics.enable=true

# Never delete data by age: replayed events may carry old timestamps, and time-based
# retention judges a segment by its newest record timestamp, not by when it was written.
log.retention.ms=-1

# Accept records up to 16 MiB, so that an oversized event reaches the worker and its
# dead-letter topic (with a reason) instead of being refused at the producer.
message.max.bytes=16777216
replica.fetch.max.bytes=16777216

# A small machine: fewer threads than the defaults (3 network, 8 io).
num.network.threads=2
num.io.threads=4
EOF
  if [[ -n "$SASL_SSL_PORT" ]]; then sasl_ssl_configs >>"$PROPS"; fi

  # Everything goes to the console appender, which the launch redirects into $LOG.
  # kafka.* is chatty at INFO (it prints every config value), so it is held at WARN,
  # except KafkaRaftServer, whose INFO line "Kafka Server started" is the ready signal.
  cat >"$LOG4J" <<'EOF'
# Generated by deploy/kafka/broker.sh.
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=WARN
log4j.logger.org.apache.kafka=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.org.apache.zookeeper=WARN
log4j.logger.kafka.server.KafkaRaftServer=INFO
EOF
}

format_storage_once() {
  # meta.properties is what `format` writes; its presence means the data dir is ours.
  if [[ -f "$DATA/meta.properties" ]]; then return 0; fi
  local cluster_id
  cluster_id=$("$JAVA" -Dlog4j.configuration="file:$LOG4J" -cp "$LIB/*" kafka.tools.StorageTool random-uuid)
  say "formatting KRaft storage in $DATA (cluster id $cluster_id)"
  local scram=()
  mapfile -t scram < <(scram_format_args)
  "$JAVA" -Dlog4j.configuration="file:$LOG4J" -cp "$LIB/*" \
    kafka.tools.StorageTool format -t "$cluster_id" -c "$PROPS" "${scram[@]}" >"$STATE/format.log" 2>&1 ||
    { cat "$STATE/format.log" >&2; die "formatting the storage failed"; }
}

launch() {
  # Keep the previous run's log for a look after a restart; the ready check then only
  # ever sees this run's "Kafka Server started".
  if [[ -f "$LOG" ]]; then mv -f "$LOG" "$LOG.1"; fi
  rm -f "$PID_FILE"
  # setsid: its own session, so the broker outlives this script and the terminal or test
  # runner that called it, and a Ctrl-C there does not reach it. The inner bash writes
  # its own pid and then becomes java (exec), so the pid file holds the JVM's pid
  # whether or not setsid had to fork. All of stdin/stdout/stderr are redirected, so
  # the broker holds no pipe of its caller open (a `subprocess.run(capture_output=True)`
  # would otherwise hang until the broker exits), and 9>&- drops the start lock.
  # shellcheck disable=SC2086,SC2016 # HEAP/JVM_OPTS split into words; $$ is the inner bash's
  setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" \
    "$JAVA" $HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true -Dlog4j.configuration="file:$LOG4J" $JVM_OPTS \
    -cp "$LIB/*" kafka.Kafka "$PROPS" \
    </dev/null >"$LOG" 2>&1 9>&- &
  for _ in {1..50}; do [[ -s "$PID_FILE" ]] && break; sleep 0.1; done
  [[ -s "$PID_FILE" ]] || die "the broker did not start; see $LOG"
}

cmd_start() {
  mkdir -p "$STATE"
  touch "$STATE_MARK"
  # One start or stop at a time (two test sessions starting at once would both format
  # and launch otherwise). The second waits here, then finds the first one's broker.
  exec 9>"$STATE/.lock"
  flock -w $((WAIT_TIMEOUT + 120)) 9 || die "another broker.sh start/stop holds $STATE/.lock"

  local pid t0=$SECONDS
  if pid=$(broker_pid); then
    if ready; then
      say "already running (pid $pid) on $HOST:$PORT; log: $LOG"
      return 0
    fi
    say "already starting (pid $pid); waiting until it answers ..."
  else
    cmd_fetch quiet
    command -v "$JAVA" >/dev/null || die "java is not installed (set JAVA_HOME or put java on PATH)"
    # Something else on our ports would make the broker die at bind time with a less
    # obvious message, or worse, make the readiness probe talk to another broker.
    local p
    for p in "$PORT" "$CONTROLLER_PORT" $SASL_SSL_PORT; do
      if port_open "$p"; then
        die "port $p on $HOST is already in use by another process (set VQL_KAFKA_PORT / VQL_KAFKA_CONTROLLER_PORT)"
      fi
    done
    mkdir -p "$DATA"
    if [[ -n "$SASL_SSL_PORT" ]]; then make_certs; fi
    write_configs
    format_storage_once
    launch
    say "started (pid $(<"$PID_FILE")); log: $LOG"
  fi
  wait_ready "$WAIT_TIMEOUT" || die "the broker did not become ready (log: $LOG; stop it with: $0 stop)"
  say "ready on $HOST:$PORT after $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------- stop etc.

cmd_stop() {
  [[ -d "$STATE" ]] || { say "not running"; return 0; }
  exec 9>"$STATE/.lock"
  flock -w $((WAIT_TIMEOUT + 120)) 9 || die "another broker.sh start/stop holds $STATE/.lock"
  local pid
  if ! pid=$(broker_pid); then
    rm -f "$PID_FILE"
    say "not running"
    return 0
  fi
  # SIGTERM runs Kafka's controlled shutdown: it flushes and closes the logs cleanly, so
  # the next start needs no log recovery. SIGKILL only if it hangs.
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    say "no exit after ${STOP_TIMEOUT} s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  rm -f "$PID_FILE"
  say "stopped (pid $pid)"
}

cmd_status() {
  local pid
  if ! pid=$(broker_pid); then
    echo "not running (state: $STATE)"
    return 3
  fi
  if ready; then
    echo "running, pid $pid, answering on $HOST:$PORT; log: $LOG"
    return 0
  fi
  echo "running, pid $pid, not answering on $HOST:$PORT (yet?); log: $LOG"
  return 1
}

cmd_reset() {
  if [[ -d "$STATE" && ! -f "$STATE_MARK" ]]; then
    die "$STATE was not made by this script (no $(basename "$STATE_MARK")); not touching it"
  fi
  cmd_stop
  if [[ -d "$STATE" ]]; then
    rm -rf "$STATE"
    say "deleted $STATE"
  fi
}

case "${1:-}" in
  fetch) cmd_fetch ;;
  start) cmd_start ;;
  wait) cmd_wait "${2:-}" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  logs) echo "$LOG" ;;
  reset) cmd_reset ;;
  *)
    echo "usage: $0 {fetch|start|wait [seconds]|stop|status|logs|reset}" >&2
    exit 2
    ;;
esac
