# Sourced by run.sh (host) and cases/canary.sh (dom0).
# canary_stream: 32 MiB of deterministic pseudo-random bytes on stdout (an
# AES-128-CTR keystream from openssl).  AES-NI, the copy loops in glibc and
# SHA-256 all use vector registers: the -cpu max corruption in the notes shows
# up as a hash that differs from the one computed on the host.
canary_stream() {
    head -c 33554432 /dev/zero |
        openssl enc -aes-128-ctr -nosalt \
            -K 000102030405060708090a0b0c0d0e0f -iv 0f0e0d0c0b0a09080706050403020100
}
