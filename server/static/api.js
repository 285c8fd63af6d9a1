// Every API call of the page goes through apiFetch: it carries the API key when one was given.
// Behind --api-key the server answers 401 and the page asks for the key (kept for this tab only).

const KEY_ITEM = "jaxpaged-api-key";

export class AuthRequired extends Error {}

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setApiKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export async function apiFetch(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new AuthRequired("this server needs an API key");
  return response;
}

// The error message of a non-2xx answer (the server's OpenAI-style error body when it sent one).
export async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return `HTTP ${response.status}`;
  }
}
