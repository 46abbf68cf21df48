"""The deployment transport: one server process and one process per hospital, talking
gRPC over mutual TLS.

Sites connect out to the server (hospital firewalls allow outbound connections only), so
the server never calls a site: each site polls for its next task and submits the answer.

* ``wire.py``   the service's methods, message framing, credentials and limits
* ``hub.py``    the server side: the servicer of the four calls, which wires
                ``auth.py`` (who is calling), ``sessions.py`` (who is connected and ready),
                ``tasks.py`` (which task waits for whom), ``intake.py`` (the checks on every
                answer, the memory budget), ``guard.py`` (what one site may hold of the
                server: calls, transfers, time) and ``audit.py`` (refusals logged and audited)
* ``transport.py`` :class:`GrpcTransport`, the :class:`~medfed.transport.base.Transport`
                the round loop talks to
* ``client.py`` the site side: join, poll, train or evaluate, submit, retry with backoff
* ``handshakes.py`` refused TLS handshakes (they fail inside gRPC) logged and audited,
                read from gRPC's log through ``stderr_relay.py``

No protobuf code generation: every message is bytes. The first message of a call is a
JSON header; tensors follow as a safetensors blob cut into chunks (models larger than one
gRPC message stream through).
"""
