"""The fleet simulator (`python -m device_sim.fleet`, or `python -m device_sim fleet`):
update a whole simulated fleet against a real server.

Why it exists: one device over loopback says nothing about how the server, the DTLS
session table, the report path (one fsynced transaction per report) and Block2
serving behave when hundreds or thousands of devices update at once over a lossy link.
The fleet simulator answers that with the real pieces end to end:

1. **Setup.** A fresh device class (`fleet-<random>`, so runs never collide with each
   other or with real devices) and N devices, each with its own DTLS identity and PSK.
   With `--data DIR` they are registered through the server's own store (the code
   path of `otacoap device add`; SQLite in WAL mode lets this process and the running
   server share the file, and the server reads identities from it on every new
   handshake). A factory image with a seq-1 envelope signed by `--key` goes into a small
   flash file per device; then a seq-2 release is built, signed and published (the
   local Publisher with `--data`, or a network upload as an operator with
   `--operator`), exactly as an operator would.
2. **Run.** Every device's update agent (device_sim.agent.DeviceAgent, unchanged) runs
   in asyncio, at most `--concurrency` at once, optionally split over `--processes`
   worker processes with their own event loops. With any impairment option each
   worker puts one netem proxy (device_sim.netem) between its devices and the server;
   the proxy keeps a lane per device, so one proxy serves them all.
3. **Verify.** A device counts as updated only when (a) its flash, read the way the
   bootloader reads it (device_sim.provision.inspect), shows the new sequence number,
   the new image's SHA-256 and a confirmed boot, and (b) the server's store holds its
   "confirmed" report for that sequence number (with `--data`; over the network the
   device's empty report outbox, i.e. every report acknowledged, is the evidence).
4. **Report.** JSON (per device and overall) and a PNG of completions over time.

The rooms, one thing each:
* `options`: the validated run options (FleetOptions), limits and defaults, FleetError;
* `report`: per-device outcomes, the summary, the JSON report and the plot;
* `counting_transport`: the device's transport with the counters the report needs;
* `preparation`: keys, the factory image and the release (built or given);
* `operator_role`: the one seam to the server side (see below);
* `worker`: one worker's devices: provision, run every agent, verify each flash;
* `processes`: the worker processes (spawn, ready/go/result) or the in-process run;
* `progress`: the progress line on stderr;
* `runtime`: what every fleet process sets up (event loop, log levels, SIGTERM);
* `run`: the whole run (setup, preflight, workers, verification, report);
* `cli`: the command line (`register` adds it to `python -m device_sim`).

Layering note (DESIGN.md): device_sim normally imports only otacoap.core. The fleet
simulator is also the operator of its own test fleet: every server-side operation it
does (register devices and publish through the store with `--data`, publish over the
network with `--operator`, read the store's reports afterwards) goes through
`operator_role`, the only module of the package that imports otacoap.store or the
operator's network client. The device code paths stay as they are.

Limits of the network mode: the server has no network device registration (an
operator identity may only publish), so with `--operator` the devices must already be
registered on the server: `--devices-file` lists their ids and PSKs, `--vendor-domain`
and `--class-info` name their class, `--seq` the release to publish. Without store
access the server-side "confirmed" check and the server's report counts are not
available; the report says so.

Every refusal is one line on stderr and a non-zero exit. Exit codes: 0 every device
updated, 1 error, 2 usage, 3 the run finished but not every device was updated.
"""
