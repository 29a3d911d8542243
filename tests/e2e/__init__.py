"""End-to-end tests: a real ``chat serve`` process, real sockets, black-box."""
