# Shared by the CGI scripts. State lives in /run/remus (tmpfs, guest RAM).
STATE=/run/remus
LOCK=$STATE/lock

# For dirty (inc needs no lock). busybox here has no flock applet: mkdir is
# the atomic test-and-set. Give up after about 10 s with 503, not forever.
lock() {
    tries=0
    until mkdir "$LOCK" 2>/dev/null; do
        tries=$((tries + 1))
        if [ $tries -ge 2000 ]; then
            reply "503 Service Unavailable" "busy"
            exit 0
        fi
        usleep 5000
    done
}

unlock() {
    rmdir "$LOCK"
}

# reply [STATUS] BODY: a plain-text CGI response, BODY plus a newline.
reply() {
    if [ $# -ge 2 ]; then
        printf 'Status: %s\r\n' "$1"
        shift
    fi
    printf 'Content-Type: text/plain\r\nCache-Control: no-store\r\n\r\n%s\n' "$1"
}
