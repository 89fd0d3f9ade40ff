# The plugin's image: the SMART app (fhir-plugin serve), the sandbox EHR and the command line.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY fhir_plugin ./fhir_plugin
COPY profiles ./profiles
COPY smart_launch ./smart_launch
COPY sandbox/__init__.py ./sandbox/__init__.py
COPY sandbox/ehr ./sandbox/ehr
RUN pip install --no-cache-dir -c constraints.txt . && useradd --create-home plugin
USER plugin
EXPOSE 8000
CMD ["fhir-plugin", "serve", "--host", "0.0.0.0", "--port", "8000"]
