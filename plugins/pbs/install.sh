#!/bin/sh
# Install the hpcrun PBS hooks: print the qmgr commands (default), or run them.
#
#   plugins/pbs/install.sh                 print the commands (review, then paste)
#   plugins/pbs/install.sh --run           run them with qmgr (as a PBS manager)
#   options: --config FILE (default: hpcrun_pbs.json next to this script),
#            --resource NAME (default: container_image; must match the config),
#            --pin-resource NAME (default: container_pin; must match the config),
#            --qmgr PATH (default: qmgr from PATH)
# The resource is a string with flag=m: PBS sends a custom resource to the
# mom (and so to the execjob_launch hook) only with that flag.  No flag=h and
# not in sched_config: the scheduler has nothing to schedule.  The pin resource
# (-l container_pin=no: run the image as it is at launch) is read only by the
# queuejob hook, on the server: no flag.  See docs/pbs.md.
set -eu

dir=$(cd "$(dirname "$0")" && pwd)
hook="$dir/hpcrun_pbs_hook.py"
config="$dir/hpcrun_pbs.json"
resource=container_image
pin_resource=container_pin
qmgr=qmgr
run=0

while [ $# -gt 0 ]; do
    case "$1" in
        --run) run=1 ;;
        --config) config=$2; shift ;;
        --resource) resource=$2; shift ;;
        --pin-resource) pin_resource=$2; shift ;;
        --qmgr) qmgr=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "install.sh: error: unknown option ($1)" >&2; exit 64 ;;
    esac
    shift
done
for f in "$hook" "$config"; do
    [ -r "$f" ] || { echo "install.sh: error: file not readable ($f)" >&2; exit 66; }
done
case "$config" in /*) ;; *) config="$(pwd)/$config" ;; esac
# qmgr takes a file name with blanks only quoted, and none with a '"' or a byte
# outside printable ASCII (OpenPBS 23.06: "Syntax error"): refuse before any change.
for f in "$hook" "$config"; do
    case "$f" in *'"'* | *[!\ -~]*)
        echo "install.sh: error: qmgr cannot import a file whose path has a '\"' or a non-ASCII" \
             "character: copy it to a plain path and give that ($f)" >&2
        exit 64 ;;
    esac
done

commands() {
    echo "create resource $resource type=string,flag=m"
    echo "create resource $pin_resource type=string"
    echo "create hook hpcrun_submit"
    echo "set hook hpcrun_submit event=\"queuejob,modifyjob\""
    echo "set hook hpcrun_submit alarm=30"
    echo "import hook hpcrun_submit application/x-python default \"$hook\""
    echo "import hook hpcrun_submit application/x-config default \"$config\""
    echo "create hook hpcrun_launch"
    echo "set hook hpcrun_launch event=execjob_launch"
    echo "set hook hpcrun_launch alarm=30"
    echo "set hook hpcrun_launch order=100"
    echo "import hook hpcrun_launch application/x-python default \"$hook\""
    echo "import hook hpcrun_launch application/x-config default \"$config\""
}

if [ "$run" = 0 ]; then
    commands | while IFS= read -r c; do
        printf "qmgr -c '%s'\n" "$(printf '%s' "$c" | sed "s/'/'\\\\''/g")"   # pastable with a ' in a path
    done
    exit 0
fi

# An existing resource (an earlier install) must have flag=m, or jobs never
# get the image at launch: add it, or say why not.
resource_flags() {
    "$qmgr" -c "list resource $resource" 2>/dev/null | sed -n 's/^[[:space:]]*flag = //p'
}
check_resource() {
    case "$(resource_flags)" in *m*) return 0 ;; esac
    echo "+ qmgr -c 'set resource $resource flag=m'"
    if ! "$qmgr" -c "set resource $resource flag=m"; then
        echo "install.sh: error: resource $resource exists without flag=m (the launch hook never" \
             "sees it) and qmgr could not add the flag: run qmgr -c 'set resource $resource flag=m'" >&2
        exit 71
    fi
    case "$(resource_flags)" in *m*) return 0 ;; esac
    echo "install.sh: error: resource $resource still has no flag=m after setting it" >&2
    exit 71
}

commands | while IFS= read -r c; do
    echo "+ qmgr -c '$c'"
    if ! "$qmgr" -c "$c"; then
        case "$c" in
            "create hook "*)
                # A hook deleted a moment ago stays "pending delete" until every mom has
                # let go of it: then wait for the name to be free; else it is a re-install.
                name=${c#create hook }
                if "$qmgr" -c "list hook $name" >/dev/null 2>&1; then
                    echo "install.sh: already there, keeping it ($c)" >&2
                else
                    n=0
                    until "$qmgr" -c "$c" 2>/dev/null; do
                        n=$((n + 1))
                        if [ $n -ge 60 ]; then
                            echo "install.sh: error: hook $name is still being deleted after 60 s ($c)" >&2
                            exit 71
                        fi
                        sleep 1
                    done
                fi ;;
            create*) echo "install.sh: already there, keeping it ($c)" >&2 ;;   # re-install
            *) echo "install.sh: error: qmgr failed ($c)" >&2; exit 71 ;;
        esac
    fi
done
check_resource
