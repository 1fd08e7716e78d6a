# The remote tier's tests and `kvtier bench remote` run real Redis-protocol servers that they start
# themselves. Install Debian's redis-server with apt-get (as root, or through sudo) unless a redis-server or
# valkey-server is on PATH already, or KVTIER_REDIS_SERVER names one. Without either, those tests skip and
# say why.
.PHONY: redis-server

redis-server:
	@if [ -n "$$KVTIER_REDIS_SERVER" ] || command -v redis-server >/dev/null 2>&1 \
			|| command -v valkey-server >/dev/null 2>&1; then \
		echo "redis server: $${KVTIER_REDIS_SERVER:-$$(command -v redis-server || command -v valkey-server)}"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			--no-install-recommends redis-server >/dev/null && echo "installed $$(redis-server --version)"; \
	else \
		echo "no redis-server, valkey-server or apt-get: the remote-tier tests will be skipped"; \
	fi
