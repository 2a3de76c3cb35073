"""The build stage: recipe -> prepare -> frontend -> pass pipeline -> backend -> quality gate -> kiln.json."""
