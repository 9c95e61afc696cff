"""The engine host that the prefill and decode services share: one AsyncEngine per process, its
Worker.Watch stream, metrics, protobuf translation and failure handling. The only services package
besides prefill/ and decode/ that imports services.engine (and so torch); services.common stays light."""
