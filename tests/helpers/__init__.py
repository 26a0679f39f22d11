"""What the tests share: copies of the repository and subprocesses (`repo`), tiny data and
working folders (`workdir`)."""
