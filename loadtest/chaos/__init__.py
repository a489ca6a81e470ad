"""``flashsale chaos``: the fault-injection suite.

Each scenario is a spike of real buyers against the real engine (``flashsale up``) on the
embedded stack, with a schedule of one kind of fault injected several times while the buyers
are served. Afterwards the run drains, makes one reconcile pass, asks for the post-sale audit
and judges what the buyers saw and what Postgres holds.

* :mod:`~loadtest.chaos.rig`: the engine and the servers the faults act on;
* :mod:`~loadtest.chaos.faults`: the faults themselves;
* :mod:`~loadtest.chaos.scenarios`: the catalogue (name, fault, how often, how sized);
* :mod:`~loadtest.chaos.spike`: one fault scenario, run and judged;
* :mod:`~loadtest.chaos.abuse` and :mod:`~loadtest.chaos.fuzz`: the abuse scenarios;
* :mod:`~loadtest.chaos.report`: results, the table, the JSON and the document block;
* :mod:`~loadtest.chaos.suite`: the whole run.
"""
