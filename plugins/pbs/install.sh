#!/bin/sh
# Install the hpcrun PBS hooks: print the qmgr commands (default), or run them.
#
#   plugins/pbs/install.sh                 print the commands (review, then paste)
#   plugins/pbs/install.sh --run           run them with qmgr (as a PBS manager)
#   options: --config FILE (default: hpcrun_pbs.json next to this script),
#            --resource NAME (default: container_image; must match the config),
#            --qmgr PATH (default: qmgr from PATH)
# The resource is a plain string: do not set flag=h and do not add it to
# sched_config (the scheduler has nothing to schedule).  See docs/pbs.md.
set -eu

dir=$(cd "$(dirname "$0")" && pwd)
hook="$dir/hpcrun_pbs_hook.py"
config="$dir/hpcrun_pbs.json"
resource=container_image
qmgr=qmgr
run=0

while [ $# -gt 0 ]; do
    case "$1" in
        --run) run=1 ;;
        --config) config=$2; shift ;;
        --resource) resource=$2; shift ;;
        --qmgr) qmgr=$2; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "install.sh: error: unknown option ($1)" >&2; exit 64 ;;
    esac
    shift
done
for f in "$hook" "$config"; do
    [ -r "$f" ] || { echo "install.sh: error: file not readable ($f)" >&2; exit 66; }
done
case "$config" in /*) ;; *) config="$(pwd)/$config" ;; esac

commands() {
    echo "create resource $resource type=string"
    echo "create hook hpcrun_submit"
    echo "set hook hpcrun_submit event=\"queuejob,modifyjob\""
    echo "set hook hpcrun_submit alarm=30"
    echo "import hook hpcrun_submit application/x-python default $hook"
    echo "import hook hpcrun_submit application/x-config default $config"
    echo "create hook hpcrun_launch"
    echo "set hook hpcrun_launch event=execjob_launch"
    echo "set hook hpcrun_launch alarm=30"
    echo "set hook hpcrun_launch order=100"
    echo "import hook hpcrun_launch application/x-python default $hook"
    echo "import hook hpcrun_launch application/x-config default $config"
}

if [ "$run" = 0 ]; then
    commands | while IFS= read -r c; do
        printf "qmgr -c '%s'\n" "$c"
    done
    exit 0
fi

commands | while IFS= read -r c; do
    echo "+ qmgr -c '$c'"
    if ! "$qmgr" -c "$c"; then
        case "$c" in
            create*) echo "install.sh: already there, keeping it ($c)" >&2 ;;   # re-install
            *) echo "install.sh: error: qmgr failed ($c)" >&2; exit 71 ;;
        esac
    fi
done
