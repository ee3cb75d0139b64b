# The production image: runtime dependencies only (requirements.lock; the tools are in
# requirements-dev.lock), static files collected at build and served by WhiteNoise with DEBUG off,
# gunicorn as the WSGI server, a non-root user. The same image runs the relay, beat and the listeners
# (docker-compose.yml gives each its command). SECRET_KEY must come from the environment at run time.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STATIC_ROOT=/app/static VAR_DIR=/app/var
WORKDIR /app
COPY requirements.lock .
RUN pip install --no-cache-dir -r requirements.lock
COPY . .
# collectstatic needs settings, not a secret: a throwaway key for this one build step.
RUN SECRET_KEY=collectstatic-only DATABASE_URL=sqlite:////tmp/build.sqlite3 \
    python manage.py collectstatic --no-input -v 0 \
 && useradd --create-home --uid 10001 app && mkdir -p /app/var && chown -R app /app/var
USER app
EXPOSE 8000
# Healthy while gunicorn answers without a server error. The header stands for the TLS proxy in
# front (no redirect to https); a 400 for a host outside ALLOWED_HOSTS still proves it is up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import http.client as h, sys; c = h.HTTPConnection('127.0.0.1', 8000, timeout=4); c.request('GET', '/admin/login/', headers={'X-Forwarded-Proto': 'https'}); sys.exit(c.getresponse().status >= 500)"]
CMD ["gunicorn", "ticketing.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "2", "--access-logfile", "-", "--forwarded-allow-ips", "*"]
