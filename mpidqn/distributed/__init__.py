"""MPI: topology and sub-communicators, collectives, the watchdog, hosts, pipeline partition and links."""
