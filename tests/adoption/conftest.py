"""The adoption tier: host_project/ is a service of its own, run by test_adoption.py."""

# Its tests belong to the host's own runs (in a copy, with the package copied in),
# not to this suite's collection.
collect_ignore = ["host_project"]
