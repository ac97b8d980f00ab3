"""The command-line programs, one module a command: `translate`, `transformer-evaluate`
(`cli.evaluate`), `transformer-export` (`cli.export`) and `transformer-compile` (`cli.compile`).

Each parses its flags, calls the library, and turns user errors into a one-line message and an
exit status (`errors.run_command`); the work itself lives in the library's modules.
"""
