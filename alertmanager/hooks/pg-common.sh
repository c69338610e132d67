# Sourced by pg-fence, pg-promote and pg-repoint (not a hook itself): the node map and the
# psql helpers they share. Install it next to them; it acts on nothing by itself.
#
#   PG_NODES  every node of the cluster as `name=host:port` words, the names being the
#             `target` names the alerts use, e.g. "em1=10.0.161.180:5432 em2=10.0.161.181:5432"
#             (a host without `:port` means 5432; write IPv6 hosts as names)
#   PGUSER, PGDATABASE, PGPASSFILE, PGSSLMODE, ...  how to connect, as for psql (default user
#             postgres); a password comes from PGPASSFILE (~/.pgpass), never from the command line
#   PGCONNECT_TIMEOUT  seconds before a node counts as unreachable (default 5)

PGUSER=${PGUSER:-postgres}
PGDATABASE=${PGDATABASE:-postgres}
PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-5}
# The fencing token (hooks.lock's etcd revision) travels in every connection's
# application_name: it shows in pg_stat_activity and in each server's log (%a), so a node can
# tell which failover touched it.
case ${CW_FENCING_TOKEN:-none} in
    *[!0-9a-z]*) FENCING_TOKEN=invalid ;;
    *) FENCING_TOKEN=${CW_FENCING_TOKEN:-none} ;;
esac
PGAPPNAME="clusterwatch-$SCRIPT token=$FENCING_TOKEN"
export PGUSER PGDATABASE PGCONNECT_TIMEOUT PGAPPNAME

say() { echo "$SCRIPT: $*" >&2; }

# node_addr NAME: prints host:port of NAME from PG_NODES; fails if NAME is not there.
node_addr() {
    for entry in ${PG_NODES:-}; do
        case $entry in
            "$1="*:*) echo "${entry#*=}"; return 0 ;;
            "$1="?*) echo "${entry#*=}:5432"; return 0 ;;
        esac
    done
    return 1
}

# node_names: every name of PG_NODES, one a line.
node_names() {
    for entry in ${PG_NODES:-}; do echo "${entry%%=*}"; done
}

# on HOST:PORT SQL: runs one statement there, unaligned rows on stdout.
on() {
    psql -X -A -t -q -v ON_ERROR_STOP=1 -h "${1%:*}" -p "${1##*:}" -c "$2"
}

# answers HOST:PORT: the server accepts connections.
answers() {
    pg_isready -q -h "${1%:*}" -p "${1##*:}" -t "$PGCONNECT_TIMEOUT"
}
