/* The v1 API of this origin, with the user's key.
 *
 * The API key lives in sessionStorage (gone when the tab closes) and goes out as a Bearer header.
 * A 401 anywhere hands over to the handler main.js registers (sign out, back to the form). */

const KEY_STORE = 'spkd.apiKey';
let unauthorizedHandler = () => {};

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || (status ? `HTTP ${status}` : 'network error'));
    this.status = status; this.code = err.code || null; this.field = err.field || null;
    this.retryAfter = null;  // seconds, from a 429's or 503's Retry-After header
  }
}

export function apiKey() { return sessionStorage.getItem(KEY_STORE); }
export function setApiKey(key) { sessionStorage.setItem(KEY_STORE, key); }
export function clearApiKey() { sessionStorage.removeItem(KEY_STORE); }
export function authHeader() { return `Bearer ${apiKey() || ''}`; }

export function onUnauthorized(fn) { unauthorizedHandler = fn; }
export function unauthorized() { unauthorizedHandler('Your API key was not accepted; sign in again.'); }

export async function api(method, path, { body, headers = {}, raw = false } = {}) {
  const h = Object.assign({ Authorization: authHeader() }, headers);
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) { h['Content-Type'] = 'application/json'; payload = JSON.stringify(body); }
  let res;
  try {
    res = await fetch(path, { method, headers: h, body: payload, cache: 'no-store' });
  } catch (e) {
    throw new ApiError(0, { error: { code: 'network', message: 'The server did not answer; retrying.' } });
  }
  if (res.status === 401) { unauthorized(); throw new ApiError(401, null); }
  if (!res.ok) {
    let data = null;
    try { data = await res.json(); } catch (e) { /* not JSON: keep the status */ }
    const err = new ApiError(res.status, data);
    err.retryAfter = res.headers.get('Retry-After');
    throw err;
  }
  if (raw) return res;
  return res.status === 204 ? null : res.json();
}

// List endpoints answer {data: [...], next_cursor}; tolerate a bare array too.
export function items(page) { return Array.isArray(page) ? page : (page.data || page.items || page.jobs || page.datasets || page.models || []); }
export function nextCursor(page) { return Array.isArray(page) ? null : (page.next_cursor || null); }
