"""The command line: thin modules that parse, resolve settings, call the library and print."""
