"""The ``visionstream`` commands: parse arguments, load settings, call into ``streams.service``
or ``streams.embedded``, print for a terminal. No logic of the service lives here."""
