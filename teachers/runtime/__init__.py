"""The ground floor: helpers every room may use (teachers, students, distill, eval, launch).

It knows nothing of teachers, students or training and imports nothing of the project:

* `placement`: rank, world size, local GPU and CPU threads, read once from the environment;
* `preempt`: save and leave on SIGUSR1/SIGTERM/SIGINT (`StopRequest`, `Preempted`, `REQUEUE_EXIT`);
* `exits`: the one guard that turns a user mistake into one line and exit status 2;
* `flags`: command-line flags made from a config dataclass;
* `files`: `torch.load` with `weights_only=True` and errors that name the file, sha256, and
  atomic writes (a file appears whole or not at all).

`placement`, `preempt`, `exits` and `flags` use the standard library only (torch is imported
lazily), so an entry script can listen for signals before the slow imports. Importing this
package imports none of its modules.
"""
