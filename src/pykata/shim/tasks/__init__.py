"""The Task RPCs of the shim, one module per concern (Kata's shim: create.go, start.go, delete.go, ...):
functions of the service's `TaskState` that go one layer down, through pykata.sandbox."""
