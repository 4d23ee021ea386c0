"""Helpers the tests share: CLI runs, checkpoint edits, llama.cpp oracles, release readers,
the fault-injecting S3 proxy and the crash runner. Not tests themselves."""
