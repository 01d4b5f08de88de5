# shellcheck shell=sh
# L2_BOOT_ARGS: kernel command line words for every L2 guest (TCG inside
# TCG, where each boot step costs 50-300x native). The nested beds put this
# file in L1's initramfs as /l2-boot-args.sh; L1's /test sources it and
# passes the words to its L2 QEMU's -append.
#
# They skip self-tests and init calls nothing in the beds uses:
#   cryptomgr.notests     the crypto self-tests, a quarter of a boot to /init
#                         at one level of TCG (x86_64: 6.3 s -> 4.7 s)
#   initcall_blacklist=   the jitter entropy RNG's health test, the KDF108
#                         self-test, encrypted keys, BPF TCP congestion
#                         kfuncs, kprobe and trace event setup: another
#                         quarter of an arm64 boot (2.6-3.1 s -> 2.0-2.1 s),
#                         15% of an x86_64 one (5.5-6.0 s -> 4.7-4.9 s)
# (A comma list: pass it whole, never through an l2.append=a,b word.)
L2_BOOT_ARGS="cryptomgr.notests initcall_blacklist=jent_mod_init,crypto_kdf108_init,init_encrypted,bpf_tcp_ca_kfunc_init,init_kprobe_trace,trace_eval_init"
