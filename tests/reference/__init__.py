"""Independent references of the methods, for tests and benchmarks only (never imported by
advcl_cli). Each is written from the facts in REFERENCE.md, in the structure of the authors'
code, and shares nothing with the package except the network whose weights it is given."""
